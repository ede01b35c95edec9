//! The key service: one thread (`ukey-keys`) loads the PKCS#11 module (a module can be
//! initialised once per process), watches slots and lists tokens; each renewal,
//! renewal plan and diagnosis runs on a thread of its own with a shared handle on the
//! module, and a further thread asks the portal for renewal statuses. So a slow or dead
//! portal, or a renewal's minutes on the key, never delay an insert or a removal.
//! While a renewal or diagnosis holds the module, the watcher's re-scans (C_Finalize +
//! C_Initialize, for SoftHSM2) wait: see [`ukey_token::Watcher`].
//!
//! Nothing here knows Tauri: the app gives an [`Emitter`], tests give a recorder.
//!
//! **Invariant:** a PIN arrives inside a [`Request::Renew`] job as a `SecretString`, is
//! handed to the engine once and dropped with the job; it is never stored, logged or
//! sent in an event, and a wrong PIN is never retried here.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use time::OffsetDateTime;
use ukey_renewal::JournalStore;
use ukey_token::{Config, Lang, Module, TokenEvent, WatchMode, Watcher};

use crate::error::{IpcError, IpcResult};
use crate::renewal::RenewOutcome;
use crate::view::{InterruptedView, KeyView, ModuleView, Snapshot, StatusView, key_view};

/// How often the watcher looks at the slots. Insert-to-banner must stay under a second.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Where the service sends what the window must show.
pub trait Emitter: Send + Sync + 'static {
    /// The snapshot changed.
    fn snapshot(&self, snapshot: &Snapshot);
    /// A key was inserted whose certificate has a renewal ready: notify the desktop.
    fn renewal_ready(&self, key: &KeyView, cert_serial: &str);
}

/// Asks a portal for a certificate's renewal status.
pub trait StatusSource: Send + Sync + 'static {
    /// Status of the certificate with this DER.
    fn status(&self, cert_der: &[u8]) -> IpcResult<StatusView>;
}

/// What the service needs to know from the settings.
#[derive(Clone)]
pub struct ServiceConfig {
    /// PKCS#11 module; `None`: detect.
    pub module: Option<PathBuf>,
    /// Portal; `None`: no statuses.
    pub portal: Option<Arc<dyn StatusSource>>,
    /// Portal base URL (for links; `portal` does the asking).
    pub portal_url: Option<String>,
    /// Data directory of the renewal journals: unfinished renewals found there (a key
    /// pulled while the app was closed, a `ukey renew` interrupted) are offered to
    /// finish when their key is inserted.
    pub data_dir: Option<PathBuf>,
    /// Language of backend messages.
    pub lang: Lang,
}

impl std::fmt::Debug for ServiceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceConfig")
            .field("module", &self.module)
            .field("portal", &self.portal.is_some())
            .field("data_dir", &self.data_dir)
            .field("lang", &self.lang)
            .finish()
    }
}

/// A renewal run, executed on a thread of its own with the module. The closure owns
/// the PIN and drops it when it returns.
pub type RenewJob = Box<dyn FnOnce(&Module) -> IpcResult<RenewOutcome> + Send>;

/// Other work needing the module (plan, diagnosis); `None` when no module is loaded.
pub type ModuleJob = Box<dyn FnOnce(Option<&Module>) + Send>;

/// Requests to the service thread.
pub enum Request {
    /// Re-read every token and ask the portal again.
    Refresh,
    /// New settings: reload the module if it changed.
    Reconfigure(ServiceConfig),
    /// Renew one certificate.
    Renew {
        /// The key's id (`KeyView::id`).
        token_id: String,
        /// Certificate serial.
        cert_serial: String,
        /// The engine run.
        job: RenewJob,
        /// Where the outcome goes.
        reply: mpsc::Sender<IpcResult<RenewOutcome>>,
    },
    /// Run something with the module.
    WithModule(ModuleJob),
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Refresh => f.write_str("Refresh"),
            Request::Reconfigure(c) => f.debug_tuple("Reconfigure").field(c).finish(),
            Request::Renew {
                token_id,
                cert_serial,
                ..
            } => f
                .debug_struct("Renew")
                .field("token_id", token_id)
                .field("cert_serial", cert_serial)
                .finish_non_exhaustive(),
            Request::WithModule(_) => f.write_str("WithModule"),
        }
    }
}

/// What the service thread receives: requests from the front end, and the end of
/// the work it started on other threads.
enum Message {
    Request(Request),
    /// A renewal thread finished.
    Finished {
        token_id: String,
        cert_serial: String,
        outcome: IpcResult<RenewOutcome>,
        reply: mpsc::Sender<IpcResult<RenewOutcome>>,
    },
    /// The last [`Service`] handle is gone.
    Stop,
}

/// Handle to the running service. When the last handle goes, the service thread is
/// told to stop and joined: it lets go of the PKCS#11 module before the process exits,
/// never during the exit (a module torn down under a running poll crashes the
/// process). A renewal still running holds its own handle on the module, so the module
/// is finalised only after it ends.
#[derive(Debug, Clone)]
pub struct Service {
    tx: mpsc::Sender<Message>,
    shared: Arc<Shared>,
    // The last one stops and joins the service thread.
    _worker: Arc<WorkerThread>,
}

/// The service thread, stopped and joined when the last [`Service`] handle is dropped.
struct WorkerThread {
    tx: mpsc::Sender<Message>,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for WorkerThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerThread")
    }
}

impl Drop for WorkerThread {
    fn drop(&mut self) {
        // Fails only when the thread is gone already.
        let _ = self.tx.send(Message::Stop);
        let handle = self.handle.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("the key service thread panicked");
            }
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    snapshot: Mutex<Snapshot>,
    /// Portal statuses by certificate serial, kept across re-listings.
    statuses: Mutex<HashMap<String, StatusView>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind, still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct PortalJob {
    cert_serial: String,
    der: Vec<u8>,
    notify: bool,
}

impl Service {
    /// Starts the service threads.
    pub fn start(config: ServiceConfig, emitter: Arc<dyn Emitter>) -> Service {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let (ptx, prx) = mpsc::channel::<(Option<Arc<dyn StatusSource>>, PortalJob)>();
        {
            let shared = shared.clone();
            let emitter = emitter.clone();
            std::thread::Builder::new()
                .name("ukey-portal-status".into())
                .spawn(move || portal_thread(prx, shared, emitter))
                // Without it statuses stay "checking"; the keys are still listed.
                .map_err(|e| tracing::error!("starting the portal status thread: {e}"))
                .ok();
        }
        let worker = {
            let shared = shared.clone();
            let to_self = tx.clone();
            std::thread::Builder::new()
                .name("ukey-keys".into())
                .spawn(move || {
                    let mut worker = Worker::new(config, shared, emitter, ptx, to_self);
                    worker.run(rx);
                })
                // Commands then answer `internal` (worker gone): nothing else to do.
                .map_err(|e| tracing::error!("starting the key service thread: {e}"))
                .ok()
        };
        Service {
            tx: tx.clone(),
            shared,
            _worker: Arc::new(WorkerThread {
                tx,
                handle: Mutex::new(worker),
            }),
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Snapshot {
        lock(&self.shared.snapshot).clone()
    }

    /// Sends a request to the service thread.
    pub fn send(&self, req: Request) -> IpcResult<()> {
        self.tx
            .send(Message::Request(req))
            .map_err(|_| IpcError::worker_gone())
    }
}

fn portal_thread(
    rx: mpsc::Receiver<(Option<Arc<dyn StatusSource>>, PortalJob)>,
    shared: Arc<Shared>,
    emitter: Arc<dyn Emitter>,
) {
    for (source, job) in rx {
        let status = match &source {
            None => StatusView::Unknown,
            Some(s) => match s.status(&job.der) {
                Ok(st) => st,
                Err(error) => StatusView::Unavailable { error },
            },
        };
        lock(&shared.statuses).insert(job.cert_serial.clone(), status.clone());
        let mut ready_on: Option<KeyView> = None;
        let snap = {
            let mut snap = lock(&shared.snapshot);
            for key in &mut snap.keys {
                let mut hit = false;
                for cert in &mut key.certificates {
                    if cert.serial.as_deref() == Some(job.cert_serial.as_str()) {
                        cert.status = status.clone();
                        hit = true;
                    }
                }
                if hit && job.notify && status.renewable() {
                    ready_on = Some(key.clone());
                }
            }
            snap.clone()
        };
        emitter.snapshot(&snap);
        if let Some(key) = ready_on {
            emitter.renewal_ready(&key, &job.cert_serial);
        }
    }
}

struct Worker {
    config: ServiceConfig,
    watcher: Option<Watcher>,
    shared: Arc<Shared>,
    emitter: Arc<dyn Emitter>,
    portal: mpsc::Sender<(Option<Arc<dyn StatusSource>>, PortalJob)>,
    /// For the renewal threads to say they are done.
    to_self: mpsc::Sender<Message>,
    /// Tokens with a renewal running (one at a time per key).
    renewing: HashSet<String>,
    /// Wrong PINs entered in this app, by token serial.
    wrong_pins: HashMap<String, u32>,
    /// Renewals stopped by a pulled key.
    interrupted: Vec<InterruptedView>,
}

impl Worker {
    fn new(
        config: ServiceConfig,
        shared: Arc<Shared>,
        emitter: Arc<dyn Emitter>,
        portal: mpsc::Sender<(Option<Arc<dyn StatusSource>>, PortalJob)>,
        to_self: mpsc::Sender<Message>,
    ) -> Worker {
        let mut w = Worker {
            config,
            watcher: None,
            shared,
            emitter,
            portal,
            to_self,
            renewing: HashSet::new(),
            wrong_pins: HashMap::new(),
            interrupted: vec![],
        };
        w.load_module();
        w
    }

    fn load_module(&mut self) {
        self.watcher = None;
        let lang = self.config.lang;
        let loaded = Config::load_default().and_then(|cfg| {
            let found = ukey_token::resolve_module(self.config.module.as_deref(), &cfg)?;
            let mut module = Module::load_found(&found)?;
            module.use_config(&cfg)?;
            Ok(module)
        });
        let module_view = match loaded {
            Ok(module) => {
                let info = module.library_info();
                let view = ModuleView {
                    path: Some(module.path().display().to_string()),
                    description: Some(format!(
                        "{} {} {}",
                        info.manufacturer, info.description, info.version
                    )),
                    error: None,
                };
                tracing::info!(path = %module.path().display(), "PKCS#11 module loaded");
                self.watcher = Some(Watcher::new(module, WatchMode::Auto));
                view
            }
            Err(e) => {
                tracing::warn!(code = e.code(), "no PKCS#11 module");
                ModuleView {
                    path: self.config.module.as_ref().map(|p| p.display().to_string()),
                    description: None,
                    error: Some(IpcError::from_token(&e, lang)),
                }
            }
        };
        let snap = {
            let mut snap = lock(&self.shared.snapshot);
            snap.module = module_view;
            snap.keys.clear();
            snap.portal_configured = self.config.portal.is_some();
            snap.portal_url = self.config.portal_url.clone();
            snap.clone()
        };
        self.emitter.snapshot(&snap);
    }

    fn run(&mut self, rx: mpsc::Receiver<Message>) {
        loop {
            let request = match rx.recv_timeout(POLL_INTERVAL) {
                Ok(Message::Request(r)) => Ok(r),
                Ok(Message::Finished {
                    token_id,
                    cert_serial,
                    outcome,
                    reply,
                }) => {
                    self.finished(&token_id, &cert_serial, &outcome);
                    // The UI may have gone away (window closed): nothing to tell then.
                    let _ = reply.send(outcome);
                    continue;
                }
                Ok(Message::Stop) => return,
                Err(e) => Err(e),
            };
            match request {
                Ok(Request::Refresh) => {
                    lock(&self.shared.statuses).clear();
                    self.relist(None, true);
                }
                Ok(Request::Reconfigure(config)) => {
                    let module_changed = config.module != self.config.module;
                    self.config = config;
                    lock(&self.shared.statuses).clear();
                    if module_changed || self.watcher.is_none() {
                        self.load_module();
                    }
                    self.relist(None, true);
                }
                Ok(Request::Renew {
                    token_id,
                    cert_serial,
                    job,
                    reply,
                }) => self.renew(token_id, cert_serial, job, reply),
                Ok(Request::WithModule(job)) => {
                    let module = self.watcher.as_ref().map(Watcher::shared_module);
                    let started = std::thread::Builder::new()
                        .name("ukey-module-job".into())
                        .spawn(move || job(module.as_deref()));
                    if let Err(e) = started {
                        // The job (and the command's answer channel) is gone: the
                        // command answers `internal`.
                        tracing::error!("starting a module job: {e}");
                    }
                }
                Err(RecvTimeoutError::Timeout) => self.poll(),
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn poll(&mut self) {
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        match watcher.poll() {
            Ok(events) if events.is_empty() => {}
            Ok(events) => {
                let inserted: Vec<String> = events
                    .iter()
                    .filter_map(|e| match e {
                        TokenEvent::Inserted { token } => Some(token.id.clone()),
                        TokenEvent::Removed { .. } => None,
                    })
                    .collect();
                for e in &events {
                    match e {
                        TokenEvent::Inserted { token } => {
                            tracing::info!(id = %token.id, "key inserted")
                        }
                        TokenEvent::Removed { id, .. } => {
                            tracing::info!(%id, "key removed")
                        }
                    }
                }
                self.relist(Some(&inserted), false);
            }
            Err(e) => tracing::warn!(code = e.code(), "watching slots failed: {e}"),
        }
    }

    /// Lists every token present and publishes the snapshot. Certificates of the
    /// `inserted` tokens (all, when `requery`) are (re)sent to the portal; a ready
    /// renewal on an inserted token raises a desktop notification.
    fn relist(&mut self, inserted: Option<&[String]>, requery: bool) {
        let Some(watcher) = self.watcher.as_ref() else {
            return;
        };
        let module = watcher.module();
        let now = OffsetDateTime::now_utc();
        let lang = self.config.lang;
        let tokens = watcher.tokens().to_vec();
        let mut keys = vec![];
        let mut jobs = vec![];
        {
            let mut statuses = lock(&self.shared.statuses);
            for token in &tokens {
                let listing = module.list_token(token, None);
                let fresh = inserted.is_some_and(|i| i.contains(&token.id));
                for cert in &listing.certificates {
                    if let Ok(d) = &cert.details {
                        if d.is_ca {
                            continue;
                        }
                        if fresh || requery || !statuses.contains_key(&d.serial) {
                            statuses.insert(d.serial.clone(), StatusView::Checking);
                            jobs.push(PortalJob {
                                cert_serial: d.serial.clone(),
                                der: cert.der.clone(),
                                notify: fresh,
                            });
                        }
                    }
                }
                let wrong = self.wrong_pins.get(&token.id).copied().unwrap_or(0);
                keys.push(key_view(&listing, now, lang, wrong, |serial| {
                    statuses
                        .get(serial)
                        .cloned()
                        .unwrap_or(StatusView::Checking)
                }));
            }
        }
        self.merge_unfinished_journals(&keys);
        for i in &mut self.interrupted {
            i.key_present = keys.iter().any(|k| k.id == i.token_id);
        }
        let snap = {
            let mut snap = lock(&self.shared.snapshot);
            snap.keys = keys;
            snap.interrupted = self.interrupted.clone();
            snap.portal_configured = self.config.portal.is_some();
            snap.portal_url = self.config.portal_url.clone();
            snap.clone()
        };
        self.emitter.snapshot(&snap);
        for job in jobs {
            // The portal thread lives as long as this one.
            let _ = self.portal.send((self.config.portal.clone(), job));
        }
    }

    /// Inserted keys with an unfinished journal are interrupted renewals; an entry
    /// whose key is inserted but whose journal is finished (or was never written, so
    /// nothing changed on the key) is dropped.
    fn merge_unfinished_journals(&mut self, keys: &[KeyView]) {
        let Some(dir) = &self.config.data_dir else {
            return;
        };
        let store = JournalStore::new(dir);
        for key in keys {
            // A renewal running here has an unfinished journal: it is not interrupted.
            if self.renewing.contains(&key.id) {
                continue;
            }
            // Keys that share a serial: a journal is this key's if a certificate it
            // names (the old one or the issued one) is on this key.
            let here: Vec<&str> = key
                .certificates
                .iter()
                .filter_map(|c| c.serial.as_deref())
                .collect();
            let unfinished: Vec<String> = match store.for_token(&key.serial) {
                Ok(js) => js
                    .into_iter()
                    .filter(|j| j.is_unfinished())
                    .filter(|j| {
                        key.id == key.serial
                            || here.contains(&j.old.serial.as_str())
                            || j.issued
                                .as_ref()
                                .is_some_and(|i| here.contains(&i.serial.as_str()))
                    })
                    .map(|j| j.old.serial)
                    .collect(),
                Err(e) => {
                    tracing::warn!("reading renewal journals: {e}");
                    continue;
                }
            };
            self.interrupted
                .retain(|i| i.token_id != key.id || unfinished.contains(&i.cert_serial));
            for cert_serial in unfinished {
                let known = self
                    .interrupted
                    .iter()
                    .any(|i| i.token_id == key.id && i.cert_serial == cert_serial);
                if !known {
                    tracing::info!(token = %key.serial, cert = %cert_serial, "unfinished renewal found");
                    self.interrupted.push(InterruptedView {
                        token_id: key.id.clone(),
                        token_label: key.label.clone(),
                        cert_serial,
                        key_present: true,
                    });
                }
            }
        }
    }

    /// Starts the renewal on a thread of its own; its end comes back as
    /// [`Message::Finished`].
    fn renew(
        &mut self,
        token_id: String,
        cert_serial: String,
        job: RenewJob,
        reply: mpsc::Sender<IpcResult<RenewOutcome>>,
    ) {
        let Some(watcher) = self.watcher.as_ref() else {
            let _ = reply.send(Err(lock(&self.shared.snapshot)
                .module
                .error
                .clone()
                .unwrap_or_else(|| IpcError::new("module_not_found", "no PKCS#11 module"))));
            return;
        };
        if self.renewing.contains(&token_id) {
            let _ = reply.send(Err(IpcError::new(
                "renewal_running",
                self.config.lang.pick(
                    "这个 UKey 正在更新证书，请等它完成",
                    "A renewal is already running on this UKey: wait for it to finish",
                ),
            )));
            return;
        }
        let module = watcher.shared_module();
        let to_self = self.to_self.clone();
        let (t, c) = (token_id.clone(), cert_serial.clone());
        let started = std::thread::Builder::new()
            .name("ukey-renewal".into())
            .spawn(move || {
                let outcome = job(&module);
                drop(module);
                let done = Message::Finished {
                    token_id: t,
                    cert_serial: c,
                    outcome,
                    reply,
                };
                // The service stopped meanwhile: answer the command directly.
                if let Err(mpsc::SendError(Message::Finished { outcome, reply, .. })) =
                    to_self.send(done)
                {
                    let _ = reply.send(outcome);
                }
            });
        match started {
            Ok(_) => {
                self.renewing.insert(token_id);
            }
            // The job and its reply channel went with the closure: the command answers
            // `internal`.
            Err(e) => tracing::error!("starting a renewal thread: {e}"),
        }
    }

    /// A renewal thread ended: remember what the outcome says about the key, and show
    /// the key as it is now.
    fn finished(&mut self, token_id: &str, cert_serial: &str, outcome: &IpcResult<RenewOutcome>) {
        self.renewing.remove(token_id);
        match outcome {
            Ok(_) => {
                self.wrong_pins.remove(token_id);
                self.interrupted.retain(|i| i.token_id != token_id);
            }
            Err(e) if e.code == "pin_incorrect" => {
                *self.wrong_pins.entry(token_id.to_owned()).or_default() += 1;
            }
            Err(e) if e.code == "token_removed" || e.code == "token_not_present" => {
                if !self.interrupted.iter().any(|i| i.token_id == token_id) {
                    let label = lock(&self.shared.snapshot)
                        .keys
                        .iter()
                        .find(|k| k.id == token_id)
                        .map(|k| k.label.clone())
                        .unwrap_or_default();
                    self.interrupted.push(InterruptedView {
                        token_id: token_id.to_owned(),
                        token_label: label,
                        cert_serial: cert_serial.to_owned(),
                        key_present: false,
                    });
                }
            }
            Err(_) => {}
        }
        // The renewal changed the token (or its PIN state) and the order: ask the portal
        // again (without a second notification), and look at the slots, since a pulled
        // key must show as gone.
        lock(&self.shared.statuses).remove(cert_serial);
        self.poll();
        self.relist(None, false);
    }
}
