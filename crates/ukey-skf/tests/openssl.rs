//! The SKF blobs against OpenSSL 3: ciphertexts, signatures and an escrow envelope that
//! OpenSSL made go through the GM/T 0016 layouts and back, and OpenSSL still decrypts
//! and verifies them.

use softhsm_fixtures::openssl_sm2::{GM_DISTID_OPT, OpenSslSm2};
use ukey_portal_api::gm::{SM4_ECB, Sm2EnvelopedKey};
use ukey_skf::abi::{
    EccCipherBlob, EccPublicKeyBlob, EccSignatureBlob, EnvelopedKeyBlob, SGD_SMS4_ECB,
};

fn ssl() -> (tempfile::TempDir, OpenSslSm2) {
    let dir = tempfile::tempdir().unwrap();
    let ssl = OpenSslSm2::new(dir.path());
    (dir, ssl)
}

fn write(ssl: &OpenSslSm2, name: &str, bytes: &[u8]) {
    std::fs::write(ssl.dir().join(name), bytes).unwrap();
}

/// The uncompressed point of an OpenSSL SM2 key (from its DER SubjectPublicKeyInfo).
fn point(spki: &[u8]) -> Vec<u8> {
    spki[spki.len() - 65..].to_vec()
}

#[test]
fn an_openssl_ciphertext_survives_the_cipher_blob_and_openssl_decrypts_it() {
    let (_d, ssl) = ssl();
    ssl.key("k").unwrap();
    ssl.run(&["pkey", "-in", "k.key", "-pubout", "-out", "k.pub"])
        .unwrap();
    write(&ssl, "m.txt", "投标文件".as_bytes());
    ssl.run(&[
        "pkeyutl", "-encrypt", "-pubin", "-inkey", "k.pub", "-in", "m.txt", "-out", "m.enc",
    ])
    .unwrap();
    let der = ssl.read("m.enc").unwrap();
    let blob = EccCipherBlob::from_der(&der).unwrap();
    assert_eq!(
        blob.cipher.len(),
        "投标文件".len(),
        "C2 is as long as the message"
    );
    let bytes = blob.to_bytes();
    let back = EccCipherBlob::from_bytes(&bytes).unwrap().to_der().unwrap();
    write(&ssl, "back.enc", &back);
    ssl.run(&[
        "pkeyutl", "-decrypt", "-inkey", "k.key", "-in", "back.enc", "-out", "back.txt",
    ])
    .unwrap();
    assert_eq!(ssl.read("back.txt").unwrap(), "投标文件".as_bytes());
}

#[test]
fn an_openssl_signature_survives_the_signature_blob_and_openssl_verifies_it() {
    let (_d, ssl) = ssl();
    let spki = ssl.key("k").unwrap();
    ssl.run(&["pkey", "-in", "k.key", "-pubout", "-out", "k.pub"])
        .unwrap();
    write(&ssl, "m.txt", b"bid");
    ssl.run(&[
        "pkeyutl",
        "-sign",
        "-inkey",
        "k.key",
        "-rawin",
        "-digest",
        "sm3",
        "-pkeyopt",
        GM_DISTID_OPT,
        "-in",
        "m.txt",
        "-out",
        "m.sig",
    ])
    .unwrap();
    let blob = EccSignatureBlob::from_der(&ssl.read("m.sig").unwrap()).unwrap();
    let back = EccSignatureBlob::from_bytes(&blob.to_bytes())
        .unwrap()
        .to_der()
        .unwrap();
    write(&ssl, "back.sig", &back);
    let ok = ssl.output(&[
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        "k.pub",
        "-rawin",
        "-digest",
        "sm3",
        "-pkeyopt",
        GM_DISTID_OPT,
        "-in",
        "m.txt",
        "-sigfile",
        "back.sig",
    ]);
    assert!(ok.status.success(), "{ok:?}");
    // The public key blob holds OpenSSL's point.
    let p = point(&spki);
    assert_eq!(EccPublicKeyBlob::from_point(&p).unwrap().point(), p);
}

#[test]
fn a_gm_t_0009_envelope_becomes_an_enveloped_key_blob_openssl_can_open() {
    let (_d, ssl) = ssl();
    // The container's signing key (the recipient) and the escrowed encryption key.
    ssl.key("sign").unwrap();
    ssl.run(&["pkey", "-in", "sign.key", "-pubout", "-out", "sign.pub"])
        .unwrap();
    let enc_spki = ssl.key("enc").unwrap();
    let dump = ssl
        .run(&["pkey", "-in", "enc.key", "-text", "-noout"])
        .unwrap();
    let hex_d: String = dump
        .split("priv:")
        .nth(1)
        .unwrap()
        .split("pub:")
        .next()
        .unwrap()
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect();
    let d = hex_decode(&hex_d);
    let d = &d[d.len().saturating_sub(32)..];
    let mut padded = vec![0u8; 64 - d.len()];
    padded.extend_from_slice(d);
    write(&ssl, "padded.bin", &padded);
    let sm4 = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";
    write(&ssl, "sm4.key", &hex_decode(sm4));
    ssl.run(&[
        "pkeyutl", "-encrypt", "-pubin", "-inkey", "sign.pub", "-in", "sm4.key", "-out", "sym.enc",
    ])
    .unwrap();
    ssl.run(&[
        "enc",
        "-sm4-ecb",
        "-nopad",
        "-K",
        sm4,
        "-in",
        "padded.bin",
        "-out",
        "priv.enc",
    ])
    .unwrap();
    let envelope = Sm2EnvelopedKey {
        sym_alg: SM4_ECB,
        sym_encrypted_key: ssl.read("sym.enc").unwrap(),
        public_key: point(&enc_spki),
        encrypted_private_key: ssl.read("priv.enc").unwrap(),
    };
    let blob = EnvelopedKeyBlob::from_gm_t_0009(&envelope).unwrap();
    assert_eq!(
        (blob.version, blob.symm_alg_id, blob.bits),
        (1, SGD_SMS4_ECB, 256)
    );
    let bytes = blob.to_bytes();
    assert_eq!(bytes.len(), 208 + 164 + 16);
    let read = EnvelopedKeyBlob::from_bytes(&bytes).unwrap();
    assert_eq!(read, blob);

    // What SKF_ImportECCKeyPair does, done by OpenSSL: the signing key opens the SM4 key,
    // which opens the private key; its public key is the blob's.
    write(&ssl, "sym2.enc", &read.cipher.to_der().unwrap());
    ssl.run(&[
        "pkeyutl", "-decrypt", "-inkey", "sign.key", "-in", "sym2.enc", "-out", "sm4.out",
    ])
    .unwrap();
    assert_eq!(ssl.read("sm4.out").unwrap(), hex_decode(sm4));
    write(&ssl, "priv2.enc", &read.encrypted_private_key);
    ssl.run(&[
        "enc",
        "-d",
        "-sm4-ecb",
        "-nopad",
        "-K",
        sm4,
        "-in",
        "priv2.enc",
        "-out",
        "priv.out",
    ])
    .unwrap();
    assert_eq!(ssl.read("priv.out").unwrap(), padded);
    assert_eq!(read.public_key.point(), point(&enc_spki));

    // A 32-byte (GM/T 0009 short form) encrypted key cannot be placed in the blob.
    let short = Sm2EnvelopedKey {
        encrypted_private_key: envelope.encrypted_private_key[32..].to_vec(),
        ..envelope
    };
    assert!(EnvelopedKeyBlob::from_gm_t_0009(&short).is_err());
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
