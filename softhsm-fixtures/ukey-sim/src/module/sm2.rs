//! The GM key's calls (see [`crate::gm`]): the vendor SM2/SM4 mechanisms of the token's
//! profile, and the translation between what SoftHSM2 stores (CKK_EC keys on the SM2
//! curve, the private scalar sealed under the token's master key) and what a GM key
//! shows (the vendor's CKK_SM2, a sensitive key that never leaves).
//!
//! Each entry point here is called by its namesake in the module only when the token
//! has a GM profile; otherwise the call goes to SoftHSM2 as before.

use super::*;
use crate::gm::{self, GmError, GmMechanism, GmProfile, SM2_EC_PARAMS};

/// Handles of SM4 session keys, which live in the shim (never in SoftHSM2): far above
/// any handle SoftHSM2 gives out.
const SM4_HANDLE_BASE: CK_OBJECT_HANDLE = 0x7E00_0000;
/// What a sealed SM2 scalar starts with.
const MAGIC: &[u8] = b"ukey-sim SM2 v1";
/// The label of the token's master key.
const MASTER_LABEL: &[u8] = b"ukey-sim GM master key";
const IV_LEN: usize = 12;
/// Attributes of an SM2 key the application may not change.
const FIXED: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_VALUE,
    CKA_SENSITIVE,
    CKA_EXTRACTABLE,
    CKA_KEY_TYPE,
    CKA_EC_PARAMS,
    CKA_EC_POINT,
];

/// A session's GM state: the operation started by C_SignInit/C_DecryptInit with a GM
/// mechanism, and the SM4 keys unwrapped in it.
#[derive(Default)]
pub(super) struct GmSession {
    op: Option<GmOp>,
    sm4: HashMap<CK_OBJECT_HANDLE, [u8; 16]>,
    next_sm4: CK_OBJECT_HANDLE,
}

#[derive(Clone, Copy)]
enum GmOp {
    Sign {
        key: CK_OBJECT_HANDLE,
        prehashed: bool,
    },
    Sm2Decrypt {
        key: CK_OBJECT_HANDLE,
    },
    Sm4Decrypt {
        key: [u8; 16],
    },
}

/// What a SoftHSM2 object is to the GM key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sm2Object {
    Private,
    Public,
}

type Attrs = Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>;

fn ulong(v: CK_ULONG) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

fn as_ulong(bytes: &[u8]) -> Option<CK_ULONG> {
    bytes.try_into().ok().map(CK_ULONG::from_ne_bytes)
}

/// Whether a CK_BBOOL read back is true (absent: false).
fn is_true(value: &Option<Vec<u8>>) -> bool {
    value.as_deref().and_then(<[u8]>::first) == Some(&CK_TRUE)
}

fn get(attrs: &Attrs, t: CK_ATTRIBUTE_TYPE) -> Option<&[u8]> {
    attrs
        .iter()
        .find(|(a, _)| *a == t)
        .map(|(_, v)| v.as_slice())
}

fn set(attrs: &mut Attrs, t: CK_ATTRIBUTE_TYPE, value: Vec<u8>) {
    match attrs.iter_mut().find(|(a, _)| *a == t) {
        Some(slot) => slot.1 = value,
        None => attrs.push((t, value)),
    }
}

fn flag(attrs: &Attrs, t: CK_ATTRIBUTE_TYPE) -> Option<bool> {
    get(attrs, t).map(|v| v.first().is_some_and(|b| *b != 0))
}

/// Copies a caller's template.
///
/// # Safety
/// `template` is null with `count` 0, or points to `count` attributes whose values are
/// valid for their lengths (the PKCS#11 contract for input templates).
unsafe fn read_template(template: CK_ATTRIBUTE_PTR, count: CK_ULONG) -> Result<Attrs, CK_RV> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if template.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: per this function's contract.
    let attrs = unsafe { std::slice::from_raw_parts(template, count as usize) };
    attrs
        .iter()
        .map(|a| {
            if a.ulValueLen == 0 {
                return Ok((a.type_, Vec::new()));
            }
            if a.pValue.is_null() {
                return Err(CKR_ATTRIBUTE_VALUE_INVALID);
            }
            // SAFETY: per this function's contract, pValue holds ulValueLen bytes.
            let v =
                unsafe { std::slice::from_raw_parts(a.pValue as *const u8, a.ulValueLen as usize) };
            Ok((a.type_, v.to_vec()))
        })
        .collect()
}

/// C_ATTRIBUTE views of `attrs`, valid while `attrs` is not touched.
pub(super) fn to_c(attrs: &mut Attrs) -> Vec<CK_ATTRIBUTE> {
    attrs
        .iter_mut()
        .map(|(t, v)| CK_ATTRIBUTE {
            type_: *t,
            pValue: if v.is_empty() {
                ptr::null_mut()
            } else {
                v.as_mut_ptr().cast()
            },
            ulValueLen: v.len() as CK_ULONG,
        })
        .collect()
}

/// Reads attributes of a SoftHSM2 object; `None` for one it does not give.
fn read_attrs(
    backend: &Backend,
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    types: &[CK_ATTRIBUTE_TYPE],
) -> Vec<Option<Vec<u8>>> {
    let mut template: Vec<CK_ATTRIBUTE> = types
        .iter()
        .map(|t| CK_ATTRIBUTE {
            type_: *t,
            pValue: ptr::null_mut(),
            ulValueLen: 0,
        })
        .collect();
    let n = template.len() as CK_ULONG;
    backend!(
        backend,
        C_GetAttributeValue(session, object, template.as_mut_ptr(), n)
    );
    let mut values: Vec<Option<Vec<u8>>> = template
        .iter()
        .map(|a| {
            (a.ulValueLen != CK_UNAVAILABLE_INFORMATION).then(|| vec![0u8; a.ulValueLen as usize])
        })
        .collect();
    for (a, v) in template.iter_mut().zip(values.iter_mut()) {
        match v {
            Some(v) if !v.is_empty() => {
                a.pValue = v.as_mut_ptr().cast();
                a.ulValueLen = v.len() as CK_ULONG;
            }
            _ => {
                // Not given, or empty: not asked again.
                a.type_ = CKA_CLASS;
                a.pValue = ptr::null_mut();
                a.ulValueLen = 0;
            }
        }
    }
    backend!(
        backend,
        C_GetAttributeValue(session, object, template.as_mut_ptr(), n)
    );
    values
}

/// Whether a SoftHSM2 object is an SM2 key, and which half.
fn sm2_object(
    backend: &Backend,
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
) -> Option<Sm2Object> {
    let v = read_attrs(
        backend,
        session,
        object,
        &[CKA_CLASS, CKA_KEY_TYPE, CKA_EC_PARAMS],
    );
    let class = v[0].as_deref().and_then(as_ulong)?;
    let key_type = v[1].as_deref().and_then(as_ulong)?;
    if key_type != CKK_EC || v[2].as_deref() != Some(SM2_EC_PARAMS) {
        return None;
    }
    match class {
        CKO_PRIVATE_KEY => Some(Sm2Object::Private),
        CKO_PUBLIC_KEY => Some(Sm2Object::Public),
        _ => None,
    }
}

/// A SoftHSM2 session of the shim's own on the token's slot, for the master key (so
/// that a find or cipher operation the application has running is not disturbed).
/// It shares the application's login, as every session of one application does.
struct Internal {
    backend: &'static Backend,
    handle: CK_SESSION_HANDLE,
}

impl Internal {
    fn open(backend: &'static Backend, slot: CK_SLOT_ID) -> Result<Internal, CK_RV> {
        let mut handle: CK_SESSION_HANDLE = 0;
        ok_or(backend!(
            backend,
            C_OpenSession(
                slot,
                CKF_SERIAL_SESSION | CKF_RW_SESSION,
                ptr::null_mut(),
                None,
                &mut handle
            )
        ))?;
        Ok(Internal { backend, handle })
    }

    /// The token's master key, made on first use (needs the user logged in).
    fn master_key(&self) -> Result<CK_OBJECT_HANDLE, CK_RV> {
        let mut find: Attrs = vec![
            (CKA_CLASS, ulong(CKO_SECRET_KEY)),
            (CKA_LABEL, MASTER_LABEL.to_vec()),
        ];
        let mut c = to_c(&mut find);
        ok_or(backend!(
            self.backend,
            C_FindObjectsInit(self.handle, c.as_mut_ptr(), c.len() as CK_ULONG)
        ))?;
        let mut found: CK_OBJECT_HANDLE = 0;
        let mut count: CK_ULONG = 0;
        let rv = backend!(
            self.backend,
            C_FindObjects(self.handle, &mut found, 1, &mut count)
        );
        backend!(self.backend, C_FindObjectsFinal(self.handle));
        ok_or(rv)?;
        if count == 1 {
            return Ok(found);
        }
        let (yes, no) = (vec![CK_TRUE], vec![CK_FALSE]);
        let mut template: Attrs = vec![
            (CKA_CLASS, ulong(CKO_SECRET_KEY)),
            (CKA_KEY_TYPE, ulong(CKK_AES)),
            (CKA_VALUE_LEN, ulong(32)),
            (CKA_TOKEN, yes.clone()),
            (CKA_PRIVATE, yes.clone()),
            (CKA_SENSITIVE, yes.clone()),
            (CKA_EXTRACTABLE, no),
            (CKA_ENCRYPT, yes.clone()),
            (CKA_DECRYPT, yes),
            (CKA_LABEL, MASTER_LABEL.to_vec()),
        ];
        let mut c = to_c(&mut template);
        let mut mechanism = CK_MECHANISM {
            mechanism: CKM_AES_KEY_GEN,
            pParameter: ptr::null_mut(),
            ulParameterLen: 0,
        };
        let mut key: CK_OBJECT_HANDLE = 0;
        ok_or(backend!(
            self.backend,
            C_GenerateKey(
                self.handle,
                &mut mechanism,
                c.as_mut_ptr(),
                c.len() as CK_ULONG,
                &mut key
            )
        ))?;
        Ok(key)
    }

    /// AES-256-GCM under the master key, one way or the other.
    fn gcm(&self, iv: &[u8; IV_LEN], data: &[u8], encrypt: bool) -> Result<Vec<u8>, CK_RV> {
        let key = self.master_key()?;
        let mut iv = *iv;
        let mut params = CK_GCM_PARAMS {
            pIv: iv.as_mut_ptr(),
            ulIvLen: IV_LEN as CK_ULONG,
            ulIvBits: (IV_LEN * 8) as CK_ULONG,
            pAAD: ptr::null_mut(),
            ulAADLen: 0,
            ulTagBits: 128,
        };
        let mut mechanism = CK_MECHANISM {
            mechanism: CKM_AES_GCM,
            pParameter: ptr::from_mut(&mut params).cast(),
            ulParameterLen: std::mem::size_of::<CK_GCM_PARAMS>() as CK_ULONG,
        };
        let mut input = data.to_vec();
        let mut out = vec![0u8; data.len() + 16];
        let mut len = out.len() as CK_ULONG;
        if encrypt {
            ok_or(backend!(
                self.backend,
                C_EncryptInit(self.handle, &mut mechanism, key)
            ))?;
            ok_or(backend!(
                self.backend,
                C_Encrypt(
                    self.handle,
                    input.as_mut_ptr(),
                    input.len() as CK_ULONG,
                    out.as_mut_ptr(),
                    &mut len
                )
            ))?;
        } else {
            ok_or(backend!(
                self.backend,
                C_DecryptInit(self.handle, &mut mechanism, key)
            ))?;
            ok_or(backend!(
                self.backend,
                C_Decrypt(
                    self.handle,
                    input.as_mut_ptr(),
                    input.len() as CK_ULONG,
                    out.as_mut_ptr(),
                    &mut len
                )
            ))?;
        }
        out.truncate(len as usize);
        Ok(out)
    }

    /// `MAGIC ‖ IV ‖ GCM(d)`.
    fn seal(&self, d: &[u8; 32]) -> Result<Vec<u8>, CK_RV> {
        let mut iv = [0u8; IV_LEN];
        getrandom::fill(&mut iv).map_err(|_| CKR_GENERAL_ERROR)?;
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&iv);
        out.extend(self.gcm(&iv, d, true)?);
        Ok(out)
    }

    fn unseal(&self, blob: &[u8]) -> Result<[u8; 32], CK_RV> {
        let rest = blob
            .strip_prefix(MAGIC)
            .ok_or(CKR_KEY_FUNCTION_NOT_PERMITTED)?;
        if rest.len() != IV_LEN + 32 + 16 {
            return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
        }
        let iv: [u8; IV_LEN] = rest[..IV_LEN].try_into().map_err(|_| CKR_GENERAL_ERROR)?;
        let d = self.gcm(&iv, &rest[IV_LEN..], false)?;
        d.try_into().map_err(|_| CKR_GENERAL_ERROR)
    }
}

impl Drop for Internal {
    fn drop(&mut self) {
        backend!(self.backend, C_CloseSession(self.handle));
    }
}

impl Shim {
    /// The GM profile of the token, if it is a GM key.
    pub(super) fn gm_profile(&self, serial: &str) -> Option<&'static GmProfile> {
        let inner = self.lock();
        let name = inner.state.token(serial)?.gm.clone()?;
        gm::profile(&name)
    }

    fn gm_session<R>(
        &self,
        handle: CK_SESSION_HANDLE,
        f: impl FnOnce(&mut GmSession) -> R,
    ) -> Result<R, CK_RV> {
        let mut inner = self.lock();
        let s = inner
            .sessions
            .get_mut(&handle)
            .ok_or(CKR_SESSION_HANDLE_INVALID)?;
        Ok(f(&mut s.gm))
    }

    fn sm4_key(&self, session: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> Option<[u8; 16]> {
        self.gm_session(session, |g| g.sm4.get(&key).copied())
            .ok()
            .flatten()
    }
}

impl SessionCall<'_> {
    fn internal(&self) -> Result<Internal, CK_RV> {
        Internal::open(self.shim.backend, self.slot)
    }

    fn sm2_object(&self, object: CK_OBJECT_HANDLE) -> Option<Sm2Object> {
        sm2_object(self.shim.backend, self.backend, object)
    }

    /// The scalar of an SM2 private key, if its CKA_`permission` is true.
    fn scalar(
        &self,
        key: CK_OBJECT_HANDLE,
        permission: CK_ATTRIBUTE_TYPE,
    ) -> Result<[u8; 32], CK_RV> {
        if self.sm2_object(key) != Some(Sm2Object::Private) {
            return Err(CKR_KEY_TYPE_INCONSISTENT);
        }
        let v = read_attrs(
            self.shim.backend,
            self.backend,
            key,
            &[permission, CKA_VALUE],
        );
        if !is_true(&v[0]) {
            return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
        }
        let blob = v[1].clone().ok_or(CKR_KEY_FUNCTION_NOT_PERMITTED)?;
        self.internal()?.unseal(&blob)
    }

    /// Creates an SM2 private key object holding the sealed scalar `d`, with the
    /// application's template (its SENSITIVE/EXTRACTABLE wishes checked: a GM key's
    /// private keys never leave it).
    fn create_private(&self, template: Attrs, d: &[u8; 32]) -> Result<CK_OBJECT_HANDLE, CK_RV> {
        let mut t = template;
        if flag(&t, CKA_SENSITIVE) == Some(false) || flag(&t, CKA_EXTRACTABLE) == Some(true) {
            return Err(CKR_ATTRIBUTE_VALUE_INVALID);
        }
        let sealed = self.internal()?.seal(d)?;
        set(&mut t, CKA_CLASS, ulong(CKO_PRIVATE_KEY));
        set(&mut t, CKA_KEY_TYPE, ulong(CKK_EC));
        set(&mut t, CKA_EC_PARAMS, SM2_EC_PARAMS.to_vec());
        set(&mut t, CKA_VALUE, sealed);
        // SoftHSM2 must let the shim read the sealed value back; the application sees
        // the key as sensitive and never extractable.
        set(&mut t, CKA_SENSITIVE, vec![CK_FALSE]);
        set(&mut t, CKA_EXTRACTABLE, vec![CK_TRUE]);
        t.retain(|(a, _)| *a != CKA_EC_POINT);
        self.create(t)
    }

    fn create(&self, mut template: Attrs) -> Result<CK_OBJECT_HANDLE, CK_RV> {
        let mut c = to_c(&mut template);
        let mut handle: CK_OBJECT_HANDLE = 0;
        ok_or(backend!(
            self.shim.backend,
            C_CreateObject(
                self.backend,
                c.as_mut_ptr(),
                c.len() as CK_ULONG,
                &mut handle
            )
        ))?;
        Ok(handle)
    }
}

/// The key type a template names, translated: the vendor's CKK_SM2 (or CKK_EC on the
/// SM2 curve) becomes SoftHSM2's CKK_EC on the SM2 curve. `Ok(true)`: an SM2 key.
fn translate_sm2_template(p: &GmProfile, t: &mut Attrs) -> Result<bool, CK_RV> {
    let key_type = get(t, CKA_KEY_TYPE).and_then(as_ulong);
    let params = get(t, CKA_EC_PARAMS);
    let sm2 =
        key_type == Some(p.ckk_sm2) || (key_type == Some(CKK_EC) && params == Some(SM2_EC_PARAMS));
    if !sm2 {
        return Ok(false);
    }
    if params.is_some_and(|v| v != SM2_EC_PARAMS) {
        return Err(CKR_TEMPLATE_INCONSISTENT);
    }
    set(t, CKA_KEY_TYPE, ulong(CKK_EC));
    set(t, CKA_EC_PARAMS, SM2_EC_PARAMS.to_vec());
    Ok(true)
}

fn gm_rv(e: GmError, data: CK_RV) -> CK_RV {
    match e {
        GmError::DataInvalid => data,
        GmError::EncryptedDataInvalid => data,
        GmError::KeyInvalid => CKR_KEY_FUNCTION_NOT_PERMITTED,
        GmError::Random => CKR_GENERAL_ERROR,
    }
}

/// The 65-byte point as CKA_EC_POINT wants it: a DER OCTET STRING.
fn ec_point_attr(point: &[u8]) -> Vec<u8> {
    let mut v = vec![0x04, point.len() as u8];
    v.extend_from_slice(point);
    v
}

/// Writes `out` to a PKCS#11 output buffer (length query, too small, or copy).
///
/// # Safety
/// `buf` is null or holds `*len` bytes; `len` is valid.
unsafe fn write_output(out: &[u8], buf: CK_BYTE_PTR, len: CK_ULONG_PTR) -> (CK_RV, bool) {
    if len.is_null() {
        return (CKR_ARGUMENTS_BAD, true);
    }
    // SAFETY: per this function's contract.
    let room = unsafe { *len } as usize;
    // SAFETY: as above.
    unsafe { *len = out.len() as CK_ULONG };
    if buf.is_null() {
        return (CKR_OK, false);
    }
    if room < out.len() {
        return (CKR_BUFFER_TOO_SMALL, false);
    }
    // SAFETY: buf holds at least `room` ≥ out.len() bytes.
    unsafe { ptr::copy_nonoverlapping(out.as_ptr(), buf, out.len()) };
    (CKR_OK, true)
}

// ---------------------------------------------------------------------------------
// Entry points, called from the module's own when the token has a GM profile.

pub(super) fn mechanism_list(p: &GmProfile) -> Vec<CK_MECHANISM_TYPE> {
    p.mechanisms().into_iter().map(|(m, _)| m).collect()
}

pub(super) fn mechanism_info(
    p: &GmProfile,
    mechanism: CK_MECHANISM_TYPE,
) -> Option<CK_MECHANISM_INFO> {
    let flags = match p.mechanism(mechanism)? {
        GmMechanism::KeyPairGen => CKF_GENERATE_KEY_PAIR | CKF_HW,
        GmMechanism::SignPrehashed | GmMechanism::SignWithSm3 => CKF_SIGN | CKF_HW,
        GmMechanism::Sm2Decrypt => CKF_DECRYPT | CKF_UNWRAP | CKF_HW,
        GmMechanism::Sm4Ecb => CKF_DECRYPT | CKF_UNWRAP | CKF_HW,
    };
    let size = if p.mechanism(mechanism) == Some(GmMechanism::Sm4Ecb) {
        128
    } else {
        256
    };
    Some(CK_MECHANISM_INFO {
        ulMinKeySize: size,
        ulMaxKeySize: size,
        flags,
    })
}

/// C_GenerateKeyPair with the profile's SM2 key pair mechanism.
///
/// # Safety
/// The C_GenerateKeyPair contract for the templates and out-pointers.
pub(super) unsafe fn generate_key_pair(
    call: &SessionCall<'_>,
    p: &GmProfile,
    public: (CK_ATTRIBUTE_PTR, CK_ULONG),
    private: (CK_ATTRIBUTE_PTR, CK_ULONG),
    out: (CK_OBJECT_HANDLE_PTR, CK_OBJECT_HANDLE_PTR),
) -> CK_RV {
    if out.0.is_null() || out.1.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    let result = (|| {
        // SAFETY: per this function's contract.
        let mut pub_t = unsafe { read_template(public.0, public.1) }?;
        // SAFETY: as above.
        let mut priv_t = unsafe { read_template(private.0, private.1) }?;
        for t in [&mut pub_t, &mut priv_t] {
            if get(t, CKA_KEY_TYPE).is_none() {
                set(t, CKA_KEY_TYPE, ulong(p.ckk_sm2));
            }
            if !translate_sm2_template(p, t)? {
                return Err(CKR_TEMPLATE_INCONSISTENT);
            }
        }
        let (d, point) = gm::generate().map_err(|e| gm_rv(e, CKR_GENERAL_ERROR))?;
        set(&mut pub_t, CKA_CLASS, ulong(CKO_PUBLIC_KEY));
        set(&mut pub_t, CKA_EC_POINT, ec_point_attr(&point));
        let public = call.create(pub_t)?;
        match call.create_private(priv_t, &d) {
            Ok(private) => Ok((public, private)),
            Err(rv) => {
                backend!(call.shim.backend, C_DestroyObject(call.backend, public));
                Err(rv)
            }
        }
    })();
    match result {
        Ok((public, private)) => {
            // SAFETY: both out-pointers are non-null and valid for one handle.
            unsafe {
                *out.0 = public;
                *out.1 = private;
            }
            CKR_OK
        }
        Err(rv) => rv,
    }
}

/// C_CreateObject: an SM2 key is stored as SoftHSM2 holds one (its scalar sealed).
/// `None`: not an SM2 key, forward it.
///
/// # Safety
/// The C_CreateObject contract.
pub(super) unsafe fn create_object(
    call: &SessionCall<'_>,
    p: &GmProfile,
    template: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
    out: CK_OBJECT_HANDLE_PTR,
) -> Option<CK_RV> {
    // SAFETY: per this function's contract.
    let mut t = match unsafe { read_template(template, count) } {
        Ok(t) => t,
        Err(rv) => return Some(rv),
    };
    match translate_sm2_template(p, &mut t) {
        Ok(true) => {}
        Ok(false) => return None,
        Err(rv) => return Some(rv),
    }
    if out.is_null() {
        return Some(CKR_ARGUMENTS_BAD);
    }
    let class = get(&t, CKA_CLASS).and_then(as_ulong);
    let created = match class {
        Some(CKO_PRIVATE_KEY) => {
            let d = get(&t, CKA_VALUE).map(<[u8]>::to_vec).unwrap_or_default();
            match gm::scalar_of(&d) {
                Ok(d) => call.create_private(t, &d),
                Err(_) => Err(CKR_ATTRIBUTE_VALUE_INVALID),
            }
        }
        _ => call.create(t),
    };
    Some(match created {
        Ok(h) => {
            // SAFETY: out is non-null and valid for one handle.
            unsafe { *out = h };
            CKR_OK
        }
        Err(rv) => rv,
    })
}

/// C_GetAttributeValue: SM4 keys answered by the shim; SM2 keys patched after
/// SoftHSM2 answers.
///
/// # Safety
/// The C_GetAttributeValue contract.
pub(super) unsafe fn get_attribute_value(
    call: &SessionCall<'_>,
    p: &GmProfile,
    object: CK_OBJECT_HANDLE,
    template: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
) -> CK_RV {
    if count > 0 && template.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    let attrs: &mut [CK_ATTRIBUTE] = if count == 0 {
        &mut []
    } else {
        // SAFETY: per this function's contract: `count` attributes the caller owns.
        unsafe { std::slice::from_raw_parts_mut(template, count as usize) }
    };
    let sm4 = object >= SM4_HANDLE_BASE && call.shim.sm4_key(call.handle, object).is_some();
    let kind = if sm4 { None } else { call.sm2_object(object) };
    let mut rv = if sm4 {
        CKR_OK
    } else {
        // The sealed value of a private key is not handed out even sealed: SoftHSM2 is
        // asked only for its length.
        let hidden: Vec<(usize, CK_VOID_PTR)> = if kind == Some(Sm2Object::Private) {
            attrs
                .iter_mut()
                .enumerate()
                .filter(|(_, a)| a.type_ == CKA_VALUE)
                .map(|(i, a)| (i, std::mem::replace(&mut a.pValue, ptr::null_mut())))
                .collect()
        } else {
            Vec::new()
        };
        let rv = backend!(
            call.shim.backend,
            C_GetAttributeValue(call.backend, object, attrs.as_mut_ptr(), count)
        );
        for (i, p) in hidden {
            attrs[i].pValue = p;
        }
        rv
    };
    if !sm4 && kind.is_none() {
        return rv;
    }
    let mut sensitive = false;
    for a in attrs.iter_mut() {
        let value: Option<Vec<u8>> = match (a.type_, sm4, kind) {
            (CKA_KEY_TYPE, true, _) => Some(ulong(p.ckk_sm4.unwrap_or(CKK_VENDOR_DEFINED))),
            (CKA_KEY_TYPE, false, _) => Some(ulong(p.ckk_sm2)),
            (CKA_CLASS, true, _) => Some(ulong(CKO_SECRET_KEY)),
            (CKA_VALUE_LEN, true, _) => Some(ulong(16)),
            (CKA_TOKEN | CKA_EXTRACTABLE | CKA_PRIVATE, true, _) => Some(vec![CK_FALSE]),
            (CKA_SENSITIVE | CKA_ALWAYS_SENSITIVE | CKA_NEVER_EXTRACTABLE, true, _) => {
                Some(vec![CK_TRUE])
            }
            (CKA_DECRYPT | CKA_UNWRAP, true, _) => Some(vec![CK_TRUE]),
            (CKA_VALUE, true, _) | (CKA_VALUE, false, Some(Sm2Object::Private)) => {
                sensitive = true;
                a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                continue;
            }
            (
                CKA_SENSITIVE | CKA_ALWAYS_SENSITIVE | CKA_NEVER_EXTRACTABLE,
                false,
                Some(Sm2Object::Private),
            ) => Some(vec![CK_TRUE]),
            (CKA_EXTRACTABLE, false, Some(Sm2Object::Private)) => Some(vec![CK_FALSE]),
            (_, true, _) => {
                rv = CKR_ATTRIBUTE_TYPE_INVALID;
                a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                continue;
            }
            _ => None,
        };
        let Some(value) = value else { continue };
        if a.pValue.is_null() {
            a.ulValueLen = value.len() as CK_ULONG;
        } else if (a.ulValueLen as usize) < value.len()
            && a.ulValueLen != CK_UNAVAILABLE_INFORMATION
        {
            rv = CKR_BUFFER_TOO_SMALL;
            a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
        } else {
            // SAFETY: pValue holds ulValueLen ≥ value.len() bytes (the caller's buffer;
            // SoftHSM2 wrote into the same one a value of this size or refused).
            unsafe { ptr::copy_nonoverlapping(value.as_ptr(), a.pValue.cast::<u8>(), value.len()) };
            a.ulValueLen = value.len() as CK_ULONG;
        }
    }
    if sensitive && matches!(rv, CKR_OK | CKR_BUFFER_TOO_SMALL) {
        rv = CKR_ATTRIBUTE_SENSITIVE;
    }
    rv
}

/// C_SetAttributeValue and C_CopyObject's template: what makes an SM2 key what it is
/// cannot change. `Some`: refused.
///
/// # Safety
/// The input template contract.
pub(super) unsafe fn refuse_fixed(
    call: &SessionCall<'_>,
    object: CK_OBJECT_HANDLE,
    template: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
) -> Option<CK_RV> {
    if object >= SM4_HANDLE_BASE && call.shim.sm4_key(call.handle, object).is_some() {
        return Some(CKR_ATTRIBUTE_READ_ONLY);
    }
    call.sm2_object(object)?;
    // SAFETY: per this function's contract.
    let t = match unsafe { read_template(template, count) } {
        Ok(t) => t,
        Err(rv) => return Some(rv),
    };
    t.iter()
        .any(|(a, _)| FIXED.contains(a))
        .then_some(CKR_ATTRIBUTE_READ_ONLY)
}

/// C_DestroyObject of an SM4 session key. `None`: not one, forward.
pub(super) fn destroy_object(call: &SessionCall<'_>, object: CK_OBJECT_HANDLE) -> Option<CK_RV> {
    if object < SM4_HANDLE_BASE {
        return None;
    }
    call.shim
        .gm_session(call.handle, |g| g.sm4.remove(&object))
        .ok()
        .flatten()
        .map(|_| CKR_OK)
}

/// C_FindObjectsInit's template with the vendor key types translated. `None`: forward
/// the caller's template as it is.
///
/// # Safety
/// The input template contract.
pub(super) unsafe fn find_template(
    p: &GmProfile,
    template: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
) -> Result<Option<Attrs>, CK_RV> {
    // SAFETY: per this function's contract.
    let mut t = unsafe { read_template(template, count) }?;
    let key_type = get(&t, CKA_KEY_TYPE).and_then(as_ulong);
    if key_type == Some(p.ckk_sm2) {
        translate_sm2_template(p, &mut t)?;
        return Ok(Some(t));
    }
    if key_type.is_some() && key_type == p.ckk_sm4 {
        // SM4 keys live in the shim and are not found: ask SoftHSM2 for nothing.
        set(
            &mut t,
            CKA_KEY_TYPE,
            ulong(CKK_VENDOR_DEFINED | 0x7FFF_FFFF),
        );
        return Ok(Some(t));
    }
    Ok(None)
}

/// Drops the master key from a C_FindObjects page. Returns the new count.
pub(super) fn hide_master(call: &SessionCall<'_>, found: &mut [CK_OBJECT_HANDLE]) -> usize {
    let mut kept = 0;
    for i in 0..found.len() {
        let label = read_attrs(call.shim.backend, call.backend, found[i], &[CKA_LABEL]);
        if label[0].as_deref() != Some(MASTER_LABEL) {
            found[kept] = found[i];
            kept += 1;
        }
    }
    kept
}

/// C_SignInit / C_DecryptInit with a GM mechanism, or with any mechanism on a GM key.
/// `None`: neither, forward.
pub(super) fn operation_init(
    call: &SessionCall<'_>,
    p: &GmProfile,
    mechanism: CK_MECHANISM_TYPE,
    key: CK_OBJECT_HANDLE,
    sign: bool,
) -> Option<CK_RV> {
    let what = p.mechanism(mechanism);
    let sm4 = (key >= SM4_HANDLE_BASE)
        .then(|| call.shim.sm4_key(call.handle, key))
        .flatten();
    let op = match (what, sign) {
        (Some(GmMechanism::SignPrehashed), true) => GmOp::Sign {
            key,
            prehashed: true,
        },
        (Some(GmMechanism::SignWithSm3), true) => GmOp::Sign {
            key,
            prehashed: false,
        },
        (Some(GmMechanism::Sm2Decrypt), false) => GmOp::Sm2Decrypt { key },
        (Some(GmMechanism::Sm4Ecb), false) => match sm4 {
            Some(key) => GmOp::Sm4Decrypt { key },
            None => return Some(CKR_KEY_TYPE_INCONSISTENT),
        },
        (Some(_), _) => return Some(CKR_MECHANISM_INVALID),
        (None, _) => {
            // A standard mechanism: not with a GM key. (Another vendor's number goes to
            // SoftHSM2, which does not know it either.)
            if mechanism < CKM_VENDOR_DEFINED
                && (sm4.is_some() || call.sm2_object(key) == Some(Sm2Object::Private))
            {
                return Some(CKR_KEY_TYPE_INCONSISTENT);
            }
            return None;
        }
    };
    let permission = match op {
        GmOp::Sign { .. } => CKA_SIGN,
        _ => CKA_DECRYPT,
    };
    if let GmOp::Sign { key, .. } | GmOp::Sm2Decrypt { key } = op {
        if call.sm2_object(key) != Some(Sm2Object::Private) {
            return Some(CKR_KEY_TYPE_INCONSISTENT);
        }
        let v = read_attrs(call.shim.backend, call.backend, key, &[permission]);
        if !is_true(&v[0]) {
            return Some(CKR_KEY_FUNCTION_NOT_PERMITTED);
        }
    }
    Some(
        match call.shim.gm_session(call.handle, |g| {
            if g.op.is_some() {
                CKR_OPERATION_ACTIVE
            } else {
                g.op = Some(op);
                CKR_OK
            }
        }) {
            Ok(rv) | Err(rv) => rv,
        },
    )
}

/// Whether the session has a GM operation of this kind running.
pub(super) fn has_operation(call: &SessionCall<'_>, sign: bool) -> bool {
    call.shim
        .gm_session(call.handle, |g| {
            matches!(
                (g.op, sign),
                (Some(GmOp::Sign { .. }), true)
                    | (
                        Some(GmOp::Sm2Decrypt { .. } | GmOp::Sm4Decrypt { .. }),
                        false
                    )
            )
        })
        .unwrap_or(false)
}

/// C_Sign or C_Decrypt of the session's GM operation. A length query keeps the
/// operation; anything else but "buffer too small" ends it.
///
/// # Safety
/// The C_Sign / C_Decrypt contract for the buffers.
pub(super) unsafe fn finish_operation(
    call: &SessionCall<'_>,
    data: CK_BYTE_PTR,
    data_len: CK_ULONG,
    out: CK_BYTE_PTR,
    out_len: CK_ULONG_PTR,
) -> CK_RV {
    let Ok(Some(op)) = call.shim.gm_session(call.handle, |g| g.op) else {
        return CKR_OPERATION_NOT_INITIALIZED;
    };
    let end = || {
        let _ = call.shim.gm_session(call.handle, |g| g.op = None);
    };
    if let (GmOp::Sign { .. }, true) = (op, out.is_null()) {
        // The signature's length is known without signing.
        // SAFETY: per this function's contract.
        return unsafe { write_output(&[0u8; 64], ptr::null_mut(), out_len) }.0;
    }
    let input = if data_len == 0 {
        Vec::new()
    } else if data.is_null() {
        end();
        return CKR_ARGUMENTS_BAD;
    } else {
        // SAFETY: data holds data_len bytes, per the contract.
        unsafe { std::slice::from_raw_parts(data, data_len as usize) }.to_vec()
    };
    let result = match op {
        GmOp::Sign { key, prehashed } => call.scalar(key, CKA_SIGN).and_then(|d| {
            gm::sign(&d, &input, prehashed)
                .map(|s| s.to_vec())
                .map_err(|e| gm_rv(e, CKR_DATA_LEN_RANGE))
        }),
        GmOp::Sm2Decrypt { key } => call.scalar(key, CKA_DECRYPT).and_then(|d| {
            gm::decrypt(&d, &input).map_err(|e| gm_rv(e, CKR_ENCRYPTED_DATA_INVALID))
        }),
        GmOp::Sm4Decrypt { key } => {
            gm::sm4_ecb(&key, &input, true).map_err(|e| gm_rv(e, CKR_ENCRYPTED_DATA_LEN_RANGE))
        }
    };
    match result {
        Ok(output) => {
            // SAFETY: per this function's contract.
            let (rv, done) = unsafe { write_output(&output, out, out_len) };
            if done {
                end();
            }
            rv
        }
        Err(rv) => {
            end();
            rv
        }
    }
}

/// C_UnwrapKey with a GM mechanism (an SM4 key from SM2, an SM2 private key from
/// SM4-ECB), or refused for a GM unwrapping key with another mechanism. `None`:
/// forward.
///
/// # Safety
/// The C_UnwrapKey contract.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn unwrap_key(
    call: &SessionCall<'_>,
    p: &GmProfile,
    mechanism: CK_MECHANISM_TYPE,
    unwrapping: CK_OBJECT_HANDLE,
    wrapped: &[u8],
    template: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
    out: CK_OBJECT_HANDLE_PTR,
) -> Option<CK_RV> {
    let sm4 = (unwrapping >= SM4_HANDLE_BASE)
        .then(|| call.shim.sm4_key(call.handle, unwrapping))
        .flatten();
    let what = p.mechanism(mechanism);
    if what.is_none() {
        if sm4.is_some() || call.sm2_object(unwrapping) == Some(Sm2Object::Private) {
            return Some(CKR_KEY_TYPE_INCONSISTENT);
        }
        return None;
    }
    if out.is_null() {
        return Some(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: per this function's contract.
    let mut t = match unsafe { read_template(template, count) } {
        Ok(t) => t,
        Err(rv) => return Some(rv),
    };
    let result = match what {
        Some(GmMechanism::Sm2Decrypt) => (|| {
            let key_type = get(&t, CKA_KEY_TYPE).and_then(as_ulong);
            if p.ckk_sm4.is_none() || (key_type.is_some() && key_type != p.ckk_sm4) {
                return Err(CKR_TEMPLATE_INCONSISTENT);
            }
            let d = call.scalar(unwrapping, CKA_UNWRAP)?;
            let key: [u8; 16] = gm::decrypt(&d, wrapped)
                .map_err(|_| CKR_WRAPPED_KEY_INVALID)?
                .try_into()
                .map_err(|_| CKR_WRAPPED_KEY_LEN_RANGE)?;
            call.shim.gm_session(call.handle, |g| {
                g.next_sm4 += 1;
                let h = SM4_HANDLE_BASE + g.next_sm4;
                g.sm4.insert(h, key);
                h
            })
        })(),
        Some(GmMechanism::Sm4Ecb) => (|| {
            let key = sm4.ok_or(CKR_KEY_TYPE_INCONSISTENT)?;
            if get(&t, CKA_KEY_TYPE).is_none() {
                set(&mut t, CKA_KEY_TYPE, ulong(p.ckk_sm2));
            }
            if !translate_sm2_template(p, &mut t)?
                || get(&t, CKA_CLASS).and_then(as_ulong) != Some(CKO_PRIVATE_KEY)
            {
                return Err(CKR_TEMPLATE_INCONSISTENT);
            }
            let plain = gm::sm4_ecb(&key, wrapped, true).map_err(|_| CKR_WRAPPED_KEY_LEN_RANGE)?;
            let d = gm::scalar_of(&plain).map_err(|_| CKR_WRAPPED_KEY_INVALID)?;
            call.create_private(t, &d)
        })(),
        _ => Err(CKR_MECHANISM_INVALID),
    };
    Some(match result {
        Ok(h) => {
            // SAFETY: out is non-null and valid for one handle.
            unsafe { *out = h };
            CKR_OK
        }
        Err(rv) => rv,
    })
}

/// Whether a key may not leave the token by C_WrapKey: an SM2 private key or an SM4
/// key of the GM key.
pub(super) fn unextractable(call: &SessionCall<'_>, key: CK_OBJECT_HANDLE) -> bool {
    (key >= SM4_HANDLE_BASE && call.shim.sm4_key(call.handle, key).is_some())
        || call.sm2_object(key) == Some(Sm2Object::Private)
}
