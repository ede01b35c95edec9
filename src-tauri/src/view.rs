//! What the window shows, as sent over IPC (camelCase JSON). Built from ukey-token's
//! listing and the portal's answers; no PKCS#11 or HTTP here, so it is unit-tested.

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use ukey_portal_api::RenewalStatus;
use ukey_token::{Lang, TokenListing};

use crate::error::IpcError;

/// Everything the main window shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// The PKCS#11 module in use, or why there is none.
    pub module: ModuleView,
    /// Inserted keys, in slot order.
    pub keys: Vec<KeyView>,
    /// Renewals that were interrupted (key pulled) and wait for their key.
    pub interrupted: Vec<InterruptedView>,
    /// Whether a portal is configured (without one every status is `unknown`).
    pub portal_configured: bool,
    /// The portal's base URL, for "apply for renewal" links.
    pub portal_url: Option<String>,
}

/// The PKCS#11 module.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleView {
    /// Its path, when one was found.
    pub path: Option<String>,
    /// Its manufacturer and description (C_GetInfo).
    pub description: Option<String>,
    /// Why no module is loaded.
    pub error: Option<IpcError>,
}

/// One inserted key (token).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyView {
    /// The key's id ([`ukey_token::TokenSummary::id`]): identifies it in commands.
    pub id: String,
    /// Token serial, as the module reports it.
    pub serial: String,
    /// Token label.
    pub label: String,
    /// Token manufacturer and model.
    pub manufacturer: String,
    /// Token model.
    pub model: String,
    /// The interface the key is used through: `pkcs11` or `skf`.
    pub interface: ukey_token::Interface,
    /// PIN state from the token flags.
    pub pin: PinView,
    /// Certificates on the key.
    pub certificates: Vec<CertView>,
    /// What could not be read.
    pub errors: Vec<IpcError>,
}

/// The user PIN's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PinView {
    /// A wrong PIN was entered since the last good one.
    pub count_low: bool,
    /// One more wrong PIN locks the key.
    pub final_try: bool,
    /// Locked.
    pub locked: bool,
    /// The PIN is entered on the device (PIN pad): no PIN dialog.
    pub pin_pad: bool,
    /// Wrong PINs entered in this app since it started (a PKCS#11 token does not say
    /// how many tries are left; this is what we saw).
    pub wrong_entries: u32,
    /// Tries left before the PIN locks, when the key says (SKF keys do).
    pub tries_left: Option<u32>,
}

/// One certificate on a key.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertView {
    /// CKA_ID, hex.
    pub key_id: String,
    /// CKA_LABEL.
    pub label: String,
    /// Serial, upper-case hex (`openssl x509 -serial`); `None` for a corrupt object.
    pub serial: Option<String>,
    /// Holder (subject CN).
    pub holder: Option<String>,
    /// Organisation (subject O).
    pub organisation: Option<String>,
    /// Full subject.
    pub subject: Option<String>,
    /// Issuer.
    pub issuer: Option<String>,
    /// RFC 3339.
    pub not_before: Option<String>,
    /// RFC 3339.
    pub not_after: Option<String>,
    /// Whole days left, rounded up; zero or less once expired.
    pub days_left: Option<i64>,
    /// `RSA-2048`, `EC-P256`, ...
    pub algorithm: Option<String>,
    /// `signing`, `encryption` or `both`.
    pub usage: Option<String>,
    /// Whether its private key is on the key (`None`: cannot tell without the PIN).
    pub has_key: Option<bool>,
    /// Why the object could not be parsed.
    pub error: Option<IpcError>,
    /// Renewal status from the portal.
    pub status: StatusView,
}

/// A certificate's renewal status, tagged by `state`. The portal's states plus
/// `checking` (asked, no answer yet), `unknown` (no portal configured, or the
/// certificate could not be parsed) and `unavailable` (the portal could not be asked).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum StatusView {
    /// Not asked yet.
    Checking,
    /// Nothing to ask, or no portal.
    Unknown,
    /// The portal could not be reached or refused.
    Unavailable {
        /// Why.
        error: IpcError,
    },
    /// No order.
    None,
    /// Order waiting for payment.
    AwaitingPayment {
        /// Order.
        #[serde(rename = "orderId")]
        order_id: String,
        /// Portal payment page, serial prefilled.
        #[serde(rename = "paymentUrl")]
        payment_url: String,
    },
    /// Paid: renew now.
    Ready {
        /// Order.
        #[serde(rename = "orderId")]
        order_id: String,
        /// Years of the renewed certificate.
        years: u32,
        /// Whether an encryption certificate comes too.
        #[serde(rename = "withEncryption")]
        with_encryption: bool,
        /// Whether the renewal makes a new key.
        #[serde(rename = "newKey")]
        new_key: bool,
        /// The portal asks for the order's renewal code (shown on the paid order page).
        #[serde(rename = "renewalCodeRequired")]
        renewal_code_required: bool,
    },
    /// Issued, installation not confirmed: renewing again finishes it.
    Issued {
        /// Order.
        #[serde(rename = "orderId")]
        order_id: String,
        /// The portal asks for the order's renewal code again.
        #[serde(rename = "renewalCodeRequired")]
        renewal_code_required: bool,
    },
    /// Done.
    Completed {
        /// Order.
        #[serde(rename = "orderId")]
        order_id: String,
        /// The renewed certificate's serial.
        #[serde(rename = "newSerial")]
        new_serial: String,
    },
    /// A new key is being mailed.
    RequiresNewKey {
        /// Order.
        #[serde(rename = "orderId")]
        order_id: String,
        /// Parcel tracking number.
        #[serde(rename = "trackingNumber")]
        tracking_number: String,
    },
    /// The CA is reached over CMP (RFC 9483), which has no status to ask: the CA says
    /// what it does when the renewal is requested.
    Cmp,
    /// Held for a reviewer's decision.
    UnderReview {
        /// Order.
        #[serde(rename = "orderId")]
        order_id: String,
    },
    /// Rejected by the reviewer.
    Rejected {
        /// Order.
        #[serde(rename = "orderId")]
        order_id: String,
        /// The reviewer's words.
        reason: String,
    },
}

impl StatusView {
    /// Whether the certificate can be renewed now (`ready`, or `issued` to finish).
    pub fn renewable(&self) -> bool {
        matches!(self, StatusView::Ready { .. } | StatusView::Issued { .. })
    }
}

impl From<RenewalStatus> for StatusView {
    fn from(s: RenewalStatus) -> StatusView {
        use ukey_portal_api::KeyPolicy;
        match s {
            RenewalStatus::None => StatusView::None,
            RenewalStatus::AwaitingPayment {
                order_id,
                payment_url,
                ..
            } => StatusView::AwaitingPayment {
                order_id,
                payment_url,
            },
            RenewalStatus::Ready {
                order_id,
                terms,
                renewal_code_required,
            } => StatusView::Ready {
                order_id,
                years: terms.years,
                with_encryption: terms.with_encryption_cert,
                new_key: terms.key_policy != KeyPolicy::Same,
                renewal_code_required,
            },
            RenewalStatus::Issued {
                order_id,
                renewal_code_required,
                ..
            } => StatusView::Issued {
                order_id,
                renewal_code_required,
            },
            RenewalStatus::Completed {
                order_id,
                certificate_serial_hex,
            } => StatusView::Completed {
                order_id,
                new_serial: certificate_serial_hex,
            },
            RenewalStatus::RequiresNewKey {
                order_id,
                tracking_number,
                ..
            } => StatusView::RequiresNewKey {
                order_id,
                tracking_number,
            },
            RenewalStatus::UnderReview { order_id, .. } => StatusView::UnderReview { order_id },
            RenewalStatus::Rejected { order_id, reason } => {
                StatusView::Rejected { order_id, reason }
            }
        }
    }
}

/// A renewal stopped because its key was pulled; it resumes when the key is back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InterruptedView {
    /// The key's id (see [`KeyView::id`]).
    pub token_id: String,
    /// Token label.
    pub token_label: String,
    /// Certificate being renewed.
    pub cert_serial: String,
    /// Whether the key is inserted again (then the UI asks for the PIN to finish).
    pub key_present: bool,
}

fn rfc3339(t: OffsetDateTime) -> Option<String> {
    t.format(&Rfc3339).ok()
}

/// Builds the view of one listed token. `status` gives the portal status known for a
/// certificate serial (or [`StatusView::Checking`]).
pub fn key_view(
    listing: &TokenListing,
    now: OffsetDateTime,
    lang: Lang,
    wrong_entries: u32,
    status: impl Fn(&str) -> StatusView,
) -> KeyView {
    let t = &listing.token;
    let certificates = listing
        .certificates
        .iter()
        .map(|c| match &c.details {
            Ok(d) => CertView {
                key_id: c.key_id_hex(),
                label: c.label.clone(),
                serial: Some(d.serial.clone()),
                holder: d.subject_cn.clone(),
                organisation: d.subject_o.clone(),
                subject: Some(d.subject.clone()),
                issuer: Some(d.issuer.clone()),
                not_before: rfc3339(d.not_before),
                not_after: rfc3339(d.not_after),
                days_left: Some(d.days_left(now)),
                algorithm: Some(d.key_algorithm.clone()),
                // A CA's certificate kept on the key is shown as the CA's and never
                // asked about.
                usage: Some(if d.is_ca { "ca" } else { d.usage.as_str() }.to_owned()),
                has_key: c.key.has_private_key(),
                error: None,
                status: if d.is_ca {
                    StatusView::Unknown
                } else {
                    status(&d.serial)
                },
            },
            Err(e) => CertView {
                key_id: c.key_id_hex(),
                label: c.label.clone(),
                serial: None,
                holder: None,
                organisation: None,
                subject: None,
                issuer: None,
                not_before: None,
                not_after: None,
                days_left: None,
                algorithm: None,
                usage: None,
                has_key: c.key.has_private_key(),
                error: Some(IpcError::from_token(e, lang)),
                status: StatusView::Unknown,
            },
        })
        .collect();
    KeyView {
        id: t.id.clone(),
        serial: t.serial.clone(),
        label: t.label.clone(),
        manufacturer: t.manufacturer.clone(),
        model: t.model.clone(),
        interface: t.interface,
        pin: PinView {
            count_low: t.pin.count_low,
            final_try: t.pin.final_try,
            locked: t.pin.locked,
            pin_pad: t.pin.protected_authentication_path,
            wrong_entries,
            tries_left: t.pin.tries_left,
        },
        certificates,
        errors: listing
            .errors
            .iter()
            .map(|e| IpcError::from_token(e, lang))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ukey_portal_api::{KeyAlgorithm, KeyPolicy, OrderTerms};

    #[test]
    fn portal_states_map_to_tagged_views() {
        let terms = OrderTerms {
            years: 2,
            key_policy: KeyPolicy::New,
            target_algorithm: KeyAlgorithm::Rsa2048,
            with_encryption_cert: true,
        };
        let v = StatusView::from(RenewalStatus::Ready {
            order_id: "o1".into(),
            terms: terms.clone(),
            renewal_code_required: true,
        });
        assert!(v.renewable());
        assert_eq!(
            serde_json::to_value(&v).expect("json"),
            serde_json::json!({"state": "ready", "orderId": "o1", "years": 2,
                "withEncryption": true, "newKey": true, "renewalCodeRequired": true})
        );
        let v = StatusView::from(RenewalStatus::Issued {
            order_id: "o1".into(),
            terms: terms.clone(),
            certificate_serial_hex: "0B".into(),
            renewal_code_required: false,
        });
        assert_eq!(
            serde_json::to_value(&v).expect("json"),
            serde_json::json!({"state": "issued", "orderId": "o1", "renewalCodeRequired": false})
        );
        let v = StatusView::from(RenewalStatus::AwaitingPayment {
            order_id: "o2".into(),
            payment_url: "http://127.0.0.1:1/pay?serial=0A".into(),
            terms,
        });
        assert!(!v.renewable());
        assert_eq!(
            serde_json::to_value(&v).expect("json"),
            serde_json::json!({"state": "awaiting_payment", "orderId": "o2",
                "paymentUrl": "http://127.0.0.1:1/pay?serial=0A"})
        );
        let v = StatusView::from(RenewalStatus::Rejected {
            order_id: "o3".into(),
            reason: "营业执照过期".into(),
        });
        assert_eq!(
            serde_json::to_value(&v).expect("json")["reason"],
            "营业执照过期"
        );
    }
}
