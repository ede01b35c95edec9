//! ukey-sim as a GM key, judged by tools none of us wrote: PyKCS11 (Debian's
//! python3-pykcs11) drives the vendor mechanisms, OpenSSL 3 checks every signature and
//! makes every ciphertext, and `pkcs11-tool` / SoftHSM2 itself show what is stored.

use super::*;

/// PyKCS11 over the shim: one command per run, a JSON line out.
/// `gen MECH CKK`: an SM2 key pair (id 01), prints its point, whether CKA_VALUE is
/// readable and CKA_SENSITIVE / CKA_EXTRACTABLE;
/// `sign MECH FILE`: signs FILE's bytes with the key, prints r‖s hex;
/// `decrypt MECH FILE`: decrypts FILE with the key, prints the plaintext hex;
/// `unwrap SM2MECH SYMFILE SM4MECH ENCFILE CKK CKK_SM4 FILE`: unwraps the SM4 key with
/// the key, the SM2 private key with it, then decrypts FILE with that key.
const PYKCS11: &str = r#"
import sys, json, PyKCS11 as P
module, serial, pin, cmd = sys.argv[1:5]
args = sys.argv[5:]
lib = P.PyKCS11Lib(); lib.load(module)
slot = [s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).serialNumber.strip() == serial][0]
s = lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
s.login(pin)
out = {"manufacturer": lib.getTokenInfo(slot).manufacturerID.strip(),
       "mechanisms": [P.CKM[m] for m in lib.getMechanismList(slot)]}
def key(cls):
    k = s.findObjects([(P.CKA_CLASS, cls), (P.CKA_ID, b"\x01")])
    assert len(k) == 1, f"{len(k)} keys"
    return k[0]
def value(o):
    # PyKCS11 gives None for an attribute the token calls sensitive.
    try:
        v = s.getAttributeValue(o, [P.CKA_VALUE], allAsBinary=True)[0]
        return None if v is None else bytes(v).hex()
    except P.PyKCS11Error as e:
        return P.CKR[e.value]
def err(f):
    try:
        f(); return "ok"
    except P.PyKCS11Error as e:
        return P.CKR[e.value]
if cmd == "gen":
    mech, ckk = int(args[0], 0), int(args[1], 0)
    pub, priv = s.generateKeyPair(
        [(P.CKA_TOKEN, True), (P.CKA_ID, b"\x01"), (P.CKA_KEY_TYPE, ckk), (P.CKA_VERIFY, True)],
        [(P.CKA_TOKEN, True), (P.CKA_PRIVATE, True), (P.CKA_ID, b"\x01"), (P.CKA_KEY_TYPE, ckk),
         (P.CKA_SIGN, True), (P.CKA_DECRYPT, True), (P.CKA_UNWRAP, True),
         (P.CKA_SENSITIVE, True), (P.CKA_EXTRACTABLE, False)],
        mecha=P.Mechanism(mech, None))
    point = bytes(s.getAttributeValue(pub, [P.CKA_EC_POINT])[0])
    out["point"] = point.hex()
    out["key_type"] = s.getAttributeValue(priv, [P.CKA_KEY_TYPE])[0]
    out["value"] = value(priv)
    out["sensitive"], out["extractable"] = s.getAttributeValue(priv, [P.CKA_SENSITIVE, P.CKA_EXTRACTABLE])
    out["make_extractable"] = err(lambda: s.setAttributeValue(priv, [(P.CKA_EXTRACTABLE, True)]))
    out["ecdsa"] = err(lambda: s.sign(priv, b"x" * 32, P.Mechanism(P.CKM_ECDSA, None)))
    out["found_by_type"] = len(s.findObjects([(P.CKA_KEY_TYPE, ckk)]))
    out["labels"] = [bytes(s.getAttributeValue(o, [P.CKA_LABEL], allAsBinary=True)[0]).decode("latin1") for o in s.findObjects([])]
elif cmd == "sign":
    sig = s.sign(key(P.CKO_PRIVATE_KEY), open(args[1], "rb").read(), P.Mechanism(int(args[0], 0), None))
    out["sig"] = bytes(sig).hex()
elif cmd == "decrypt":
    pt = s.decrypt(key(P.CKO_PRIVATE_KEY), open(args[1], "rb").read(), P.Mechanism(int(args[0], 0), None))
    out["plain"] = bytes(pt).hex()
elif cmd == "unwrap":
    sm2m, sym, sm4m, enc, ckk, ckk4, ct = args
    sm4 = s.unwrapKey(key(P.CKO_PRIVATE_KEY), open(sym, "rb").read(),
        [(P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_KEY_TYPE, int(ckk4, 0)), (P.CKA_TOKEN, False)],
        P.Mechanism(int(sm2m, 0), None))
    out["sm4_value"] = value(sm4)
    enc_key = s.unwrapKey(sm4, open(enc, "rb").read(),
        [(P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_KEY_TYPE, int(ckk, 0)), (P.CKA_TOKEN, True),
         (P.CKA_PRIVATE, True), (P.CKA_ID, b"\x02"), (P.CKA_DECRYPT, True)],
        P.Mechanism(int(sm4m, 0), None))
    out["plain"] = bytes(s.decrypt(enc_key, open(ct, "rb").read(), P.Mechanism(int(sm2m, 0), None))).hex()
print(json.dumps(out))
"#;

struct Gm {
    sim: Sim,
    dir: tempfile::TempDir,
}

fn gm(profile: &str) -> Gm {
    let sim = sim(&[TokenSpec::empty("GM-KEY")]);
    let set = sim.cli(&["gm", sim.serial(0), profile]);
    assert!(set.status.success(), "{}", text(&set));
    Gm {
        sim,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Gm {
    fn py(&self, args: &[&str]) -> serde_json::Value {
        let out = self
            .sim
            .command("/usr/bin/python3")
            .arg("-c")
            .arg(PYKCS11)
            .arg(shim_path())
            .args([self.sim.serial(0), USER_PIN])
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run PyKCS11");
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
    }

    fn openssl(&self, args: &[&str]) -> Output {
        Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run openssl")
    }

    fn openssl_ok(&self, args: &[&str]) -> String {
        let out = self.openssl(args);
        assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.dir.path().join(name), bytes).unwrap();
    }

    /// `pub.pem`: the SM2 public key whose CKA_EC_POINT (DER OCTET STRING) is
    /// `point_attr`, as a SubjectPublicKeyInfo OpenSSL reads.
    fn public_pem(&self, point_attr: &str) {
        let attr = hex::decode(point_attr).unwrap();
        assert_eq!(&attr[..2], &[0x04, 0x41], "CKA_EC_POINT is an OCTET STRING");
        let mut spki = hex::decode("3059301306072a8648ce3d020106082a811ccf5501822d034200").unwrap();
        spki.extend_from_slice(&attr[2..]);
        self.write("pub.der", &spki);
        self.openssl_ok(&[
            "pkey", "-pubin", "-inform", "DER", "-in", "pub.der", "-out", "pub.pem",
        ]);
    }
}

/// `r ‖ s` as DER `SEQUENCE { INTEGER r, INTEGER s }`.
fn der_signature(raw: &[u8]) -> Vec<u8> {
    let int = |v: &[u8]| {
        let v = &v[v.iter().position(|b| *b != 0).unwrap_or(v.len() - 1)..];
        let mut out = vec![0x02];
        let pad = v[0] & 0x80 != 0;
        out.push((v.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
        out
    };
    let body = [int(&raw[..32]), int(&raw[32..])].concat();
    [vec![0x30, body.len() as u8], body].concat()
}

fn verify_with_gm_id(g: &Gm, msg: &str, sig_hex: &str) -> Output {
    g.write("sig.der", &der_signature(&hex::decode(sig_hex).unwrap()));
    g.openssl(&[
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        "pub.pem",
        "-rawin",
        "-digest",
        "sm3",
        "-pkeyopt",
        "distid:1234567812345678",
        "-in",
        msg,
        "-sigfile",
        "sig.der",
    ])
}

/// The digest e = SM3(Z ‖ M) a host computes for the prehashed mechanism. OpenSSL 3
/// has no command that prints e, so Z's input (ENTL ‖ ID ‖ a ‖ b ‖ xG ‖ yG ‖ xA ‖ yA,
/// GM/T 0003.2) is laid out here and hashed by `openssl dgst -sm3`.
fn e_by_openssl(g: &Gm, msg: &str) -> Vec<u8> {
    let attr = std::fs::read(g.dir.path().join("pub.der")).unwrap();
    let point = &attr[attr.len() - 64..];
    let curve = hex::decode(concat!(
        "FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC",
        "28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93",
        "32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7",
        "BC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0",
    ))
    .unwrap();
    let id = b"1234567812345678";
    let mut za = vec![0x00, 0x80];
    za.extend_from_slice(id);
    za.extend_from_slice(&curve);
    za.extend_from_slice(point);
    g.write("za.bin", &za);
    let z = hex::decode(
        g.openssl_ok(&["dgst", "-sm3", "-r", "za.bin"])
            .split(' ')
            .next()
            .unwrap(),
    )
    .unwrap();
    let mut zm = z;
    zm.extend(std::fs::read(g.dir.path().join(msg)).unwrap());
    g.write("zm.bin", &zm);
    hex::decode(
        g.openssl_ok(&["dgst", "-sm3", "-r", "zm.bin"])
            .split(' ')
            .next()
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn a_tass_gm_key_generates_signs_and_decrypts_with_its_vendor_mechanisms() {
    let g = gm("tass");
    let tass = ukey_sim::gm::profile("tass").unwrap();
    let hexn = |v: u64| format!("{v:#x}");
    let out = g.py(&["gen", &hexn(tass.key_pair_gen), &hexn(tass.ckk_sm2)]);
    assert_eq!(out["manufacturer"], "TASS", "{out}");
    assert_eq!(
        out["key_type"], tass.ckk_sm2,
        "the vendor's key type: {out}"
    );
    assert!(out["value"].is_null(), "CKA_VALUE is sensitive: {out}");
    assert_eq!(out["sensitive"], true, "{out}");
    assert_eq!(out["extractable"], false, "{out}");
    assert_eq!(out["make_extractable"], "CKR_ATTRIBUTE_READ_ONLY", "{out}");
    assert_eq!(out["ecdsa"], "CKR_KEY_TYPE_INCONSISTENT", "{out}");
    assert_eq!(
        out["found_by_type"], 2,
        "both halves by the vendor key type: {out}"
    );
    let labels = out["labels"].to_string();
    assert!(
        !labels.contains("master"),
        "the master key is hidden: {labels}"
    );
    g.public_pem(out["point"].as_str().unwrap());

    // With SM3 on the token: OpenSSL verifies with the GM ID, and not with the empty one.
    g.write("bid.txt", "投标文件 2026".as_bytes());
    let signed = g.py(&["sign", &hexn(tass.sign_with_sm3), "bid.txt"]);
    let sig = signed["sig"].as_str().unwrap();
    let ok = verify_with_gm_id(&g, "bid.txt", sig);
    assert!(ok.status.success(), "{}", text(&ok));
    let empty_id = g.openssl(&[
        "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin", "-digest", "sm3", "-in",
        "bid.txt", "-sigfile", "sig.der",
    ]);
    assert!(!empty_id.status.success(), "{}", text(&empty_id));

    // Prehashed: the host's e (computed with OpenSSL's SM3) signed on the token.
    let e = e_by_openssl(&g, "bid.txt");
    g.write("e.bin", &e);
    let signed = g.py(&["sign", &hexn(tass.sign_prehashed), "e.bin"]);
    let ok = verify_with_gm_id(&g, "bid.txt", signed["sig"].as_str().unwrap());
    assert!(ok.status.success(), "{}", text(&ok));

    // OpenSSL encrypts to the public key; the token decrypts.
    g.openssl_ok(&[
        "pkeyutl", "-encrypt", "-pubin", "-inkey", "pub.pem", "-in", "bid.txt", "-out", "bid.enc",
    ]);
    let plain = g.py(&["decrypt", &hexn(tass.sm2_decrypt.unwrap()), "bid.enc"]);
    assert_eq!(
        hex::decode(plain["plain"].as_str().unwrap()).unwrap(),
        "投标文件 2026".as_bytes()
    );

    // SoftHSM2 itself, without the shim: the master key is there, and the private
    // key's value is sealed (no 32-byte scalar stored).
    let raw = g
        .sim
        .command("pkcs11-tool")
        .args(["--module"])
        .arg(softhsm_fixtures::softhsm_module().unwrap())
        .args([
            "--token-label",
            "GM-KEY",
            "--login",
            "--pin",
            USER_PIN,
            "-O",
        ])
        .output()
        .unwrap();
    let raw = text(&raw);
    assert!(raw.contains("ukey-sim GM master key"), "{raw}");
}

#[test]
fn a_luna_gm_key_answers_only_to_its_own_numbers() {
    let g = gm("luna");
    let (luna, tass) = (
        ukey_sim::gm::profile("luna").unwrap(),
        ukey_sim::gm::profile("tass").unwrap(),
    );
    let hexn = |v: u64| format!("{v:#x}");

    let out = g.py(&["gen", &hexn(luna.key_pair_gen), &hexn(luna.ckk_sm2)]);
    // cryptoki drops vendor mechanisms from its list; PyKCS11 shows them.
    let mechanisms: Vec<u64> = out["mechanisms"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .collect();
    assert!(mechanisms.contains(&luna.key_pair_gen), "{mechanisms:x?}");
    assert!(mechanisms.contains(&luna.sign_prehashed), "{mechanisms:x?}");
    assert!(!mechanisms.contains(&tass.key_pair_gen), "{mechanisms:x?}");
    assert!(
        mechanisms.contains(&0x1082),
        "SoftHSM2's own stay: {mechanisms:x?}"
    );
    assert_eq!(out["manufacturer"], "SafeNet", "{out}");
    assert_eq!(out["key_type"], luna.ckk_sm2, "{out}");
    g.public_pem(out["point"].as_str().unwrap());
    g.write("m.txt", b"luna");
    let signed = g.py(&["sign", &hexn(luna.sign_with_sm3), "m.txt"]);
    let ok = verify_with_gm_id(&g, "m.txt", signed["sig"].as_str().unwrap());
    assert!(ok.status.success(), "{}", text(&ok));

    // TASS's signing number means nothing to this key.
    let out = g
        .sim
        .command("/usr/bin/python3")
        .arg("-c")
        .arg(PYKCS11)
        .arg(shim_path())
        .args([
            g.sim.serial(0),
            USER_PIN,
            "sign",
            &hexn(tass.sign_with_sm3),
            "m.txt",
        ])
        .current_dir(g.dir.path())
        .output()
        .unwrap();
    let all = text(&out);
    assert!(
        !out.status.success() && all.contains("CKR_MECHANISM_INVALID"),
        "{all}"
    );
}

#[test]
fn an_escrowed_key_in_a_gm_envelope_is_unwrapped_on_the_token_and_decrypts() {
    let g = gm("tass");
    let tass = ukey_sim::gm::profile("tass").unwrap();
    let hexn = |v: u64| format!("{v:#x}");
    let out = g.py(&["gen", &hexn(tass.key_pair_gen), &hexn(tass.ckk_sm2)]);
    g.public_pem(out["point"].as_str().unwrap());

    // The CA's side, all OpenSSL: an SM2 encryption key, a random SM4 key encrypted to
    // the token's signing key, the private scalar SM4-ECB encrypted (64 bytes, padded
    // as GM/T 0016 does).
    g.openssl_ok(&["genpkey", "-algorithm", "SM2", "-out", "enc.key"]);
    g.openssl_ok(&["pkey", "-in", "enc.key", "-pubout", "-out", "enc.pub"]);
    let dump = g.openssl_ok(&["pkey", "-in", "enc.key", "-text", "-noout"]);
    let priv_hex: String = dump
        .split("priv:")
        .nth(1)
        .unwrap()
        .split("pub:")
        .next()
        .unwrap()
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect();
    let mut d = hex::decode(priv_hex).unwrap();
    while d.len() > 32 && d[0] == 0 {
        d.remove(0);
    }
    let mut padded = vec![0u8; 64 - d.len()];
    padded.extend_from_slice(&d);
    g.write("enc.plain", &padded);
    let sm4 = "00112233445566778899aabbccddeeff";
    g.write("sm4.key", &hex::decode(sm4).unwrap());
    g.openssl_ok(&[
        "pkeyutl", "-encrypt", "-pubin", "-inkey", "pub.pem", "-in", "sm4.key", "-out", "sym.enc",
    ]);
    g.openssl_ok(&[
        "enc",
        "-sm4-ecb",
        "-nopad",
        "-K",
        sm4,
        "-in",
        "enc.plain",
        "-out",
        "enc.blob",
    ]);
    g.write("bid.txt", b"sealed bid");
    g.openssl_ok(&[
        "pkeyutl", "-encrypt", "-pubin", "-inkey", "enc.pub", "-in", "bid.txt", "-out", "bid.enc",
    ]);

    let out = g.py(&[
        "unwrap",
        &hexn(tass.sm2_decrypt.unwrap()),
        "sym.enc",
        &hexn(tass.sm4_ecb.unwrap()),
        "enc.blob",
        &hexn(tass.ckk_sm2),
        &hexn(tass.ckk_sm4.unwrap()),
        "bid.enc",
    ]);
    assert!(out["sm4_value"].is_null(), "{out}");
    assert_eq!(
        hex::decode(out["plain"].as_str().unwrap()).unwrap(),
        b"sealed bid"
    );
}
