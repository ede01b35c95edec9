//! 国密 test material made by OpenSSL 3 (never by our code): SM2 CAs, SM2 keys, and
//! certificates signed with the GM/T 0009 distinguishing ID or with OpenSSL's default
//! empty one, in a directory of files named after what they are.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::FixtureError;

/// `-sigopt`/`-vfyopt`/`-pkeyopt` value for the GM distinguishing ID.
pub const GM_DISTID_OPT: &str = "distid:1234567812345678";

/// Which distinguishing ID a certificate is signed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedId {
    /// `1234567812345678`, as the Chinese PKI signs.
    Gm,
    /// OpenSSL's default (empty): what a CA that forgot the ID produces.
    Empty,
}

/// OpenSSL run in one directory.
#[derive(Debug, Clone)]
pub struct OpenSslSm2 {
    dir: PathBuf,
}

impl OpenSslSm2 {
    /// Files go to (and are read from) `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> OpenSslSm2 {
        OpenSslSm2 { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `openssl ARGS` in the directory, whatever its outcome.
    pub fn output(&self, args: &[&str]) -> Output {
        Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run openssl: {e}"))
    }

    /// `openssl ARGS`, which must succeed: its stdout.
    pub fn run(&self, args: &[&str]) -> Result<String, FixtureError> {
        let out = self.output(args);
        if !out.status.success() {
            return Err(FixtureError::OpenSsl {
                args: args.join(" "),
                stderr: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A new SM2 key `{name}.key` (PKCS#8 PEM); its SubjectPublicKeyInfo, DER.
    pub fn key(&self, name: &str) -> Result<Vec<u8>, FixtureError> {
        let key = format!("{name}.key");
        let spki = format!("{name}.spki");
        self.run(&["genpkey", "-algorithm", "SM2", "-out", &key])?;
        self.run(&[
            "pkey", "-in", &key, "-pubout", "-outform", "DER", "-out", &spki,
        ])?;
        self.read(&spki)
    }

    /// A self-signed SM2 root CA (GM ID), `{name}.key` and `{name}.pem`, with the
    /// subject `subject` (`/C=CN/O=…/CN=…`, UTF-8).
    pub fn ca(&self, name: &str, subject: &str) -> Result<(), FixtureError> {
        let key = format!("{name}.key");
        self.run(&["genpkey", "-algorithm", "SM2", "-out", &key])?;
        self.run(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &key,
            "-sm3",
            "-sigopt",
            GM_DISTID_OPT,
            "-utf8",
            "-subj",
            subject,
            "-days",
            "3650",
            "-out",
            &format!("{name}.pem"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])?;
        Ok(())
    }

    /// A signing certificate `{name}.pem` (and `{name}.der`) for a new SM2 key
    /// `{name}.key`, with `subject`, issued by the CA `ca` and signed with `id`.
    pub fn leaf(
        &self,
        ca: &str,
        name: &str,
        subject: &str,
        id: SignedId,
    ) -> Result<(), FixtureError> {
        self.leaf_with_usage(ca, name, subject, id, "digitalSignature,nonRepudiation")
    }

    /// An encryption certificate (keyEncipherment, dataEncipherment), otherwise as
    /// [`OpenSslSm2::leaf`].
    pub fn encryption_leaf(&self, ca: &str, name: &str, subject: &str) -> Result<(), FixtureError> {
        self.leaf_with_usage(
            ca,
            name,
            subject,
            SignedId::Gm,
            "keyEncipherment,dataEncipherment",
        )
    }

    /// [`OpenSslSm2::leaf`] with this keyUsage (critical).
    pub fn leaf_with_usage(
        &self,
        ca: &str,
        name: &str,
        subject: &str,
        id: SignedId,
        usage: &str,
    ) -> Result<(), FixtureError> {
        std::fs::write(
            self.dir.join("leaf.ext"),
            format!("basicConstraints=CA:FALSE\nkeyUsage=critical,{usage}\n"),
        )
        .map_err(|source| FixtureError::Io {
            action: "write",
            path: self.dir.join("leaf.ext"),
            source,
        })?;
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        self.run(&["genpkey", "-algorithm", "SM2", "-out", &key])?;
        self.run(&[
            "req",
            "-new",
            "-key",
            &key,
            "-sm3",
            "-sigopt",
            GM_DISTID_OPT,
            "-utf8",
            "-subj",
            subject,
            "-out",
            &csr,
        ])?;
        let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-sm3",
            "-vfyopt",
            GM_DISTID_OPT,
            "-days",
            "365",
            "-extfile",
            "leaf.ext",
            "-out",
            &pem,
        ];
        if id == SignedId::Gm {
            args.extend(["-sigopt", GM_DISTID_OPT]);
        }
        self.run(&args)?;
        self.run(&[
            "x509",
            "-in",
            &pem,
            "-outform",
            "DER",
            "-out",
            &format!("{name}.der"),
        ])?;
        Ok(())
    }

    /// The private scalar (32 bytes) and uncompressed public point (65 bytes) of the
    /// SM2 key `{name}.key`, as `openssl pkey -text` prints them: what a CA's
    /// personalisation writes into a key.
    pub fn scalar_and_point(&self, name: &str) -> Result<(Vec<u8>, Vec<u8>), FixtureError> {
        let text = self.run(&["pkey", "-in", &format!("{name}.key"), "-noout", "-text"])?;
        let block = |label: &str| -> Vec<u8> {
            let mut hex = String::new();
            let mut inside = false;
            for line in text.lines() {
                let t = line.trim();
                if t.starts_with(label) {
                    inside = true;
                    continue;
                }
                if inside {
                    if t.contains(':') && t.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
                        hex.extend(t.chars().filter(|c| *c != ':'));
                    } else {
                        break;
                    }
                }
            }
            hex::decode(hex).unwrap_or_default()
        };
        let (mut d, point) = (block("priv:"), block("pub:"));
        // OpenSSL prints the scalar as an integer: a leading 00 byte, or fewer than 32.
        while d.len() > 32 && d[0] == 0 {
            d.remove(0);
        }
        let mut scalar = vec![0u8; 32usize.saturating_sub(d.len())];
        scalar.extend(d);
        if scalar.len() != 32 || point.len() != 65 {
            return Err(FixtureError::OpenSsl {
                args: format!("pkey -in {name}.key -noout -text"),
                stderr: "no 32-byte priv: and 65-byte pub: in its output".into(),
            });
        }
        Ok((scalar, point))
    }

    /// The DER inside PEM file `file`.
    pub fn der(&self, file: &str) -> Result<Vec<u8>, FixtureError> {
        let out = format!("{file}.der.tmp");
        self.run(&["x509", "-in", file, "-outform", "DER", "-out", &out])?;
        self.read(&out)
    }

    /// `openssl verify -vfyopt distid:… -CAfile {ca}.pem FILE` succeeds.
    pub fn verifies_with_gm_id(&self, ca: &str, file: &str) -> bool {
        self.output(&[
            "verify",
            "-vfyopt",
            GM_DISTID_OPT,
            "-CAfile",
            &format!("{ca}.pem"),
            file,
        ])
        .status
        .success()
    }

    /// A file of the directory.
    pub fn read(&self, file: &str) -> Result<Vec<u8>, FixtureError> {
        let path = self.dir.join(file);
        std::fs::read(&path).map_err(|source| FixtureError::Io {
            action: "read",
            path,
            source,
        })
    }
}
