//! A real PostgreSQL server from Debian's `postgresql` package, in a temp dir, on a free
//! loopback port, for the store's tests and benchmarks. `cargo xtask setup` installs the
//! package; without it the tests fail saying so (nothing is skipped).
//!
//! PostgreSQL refuses to run as root: as root, `initdb` and `postgres` run as the
//! `postgres` user the package creates (the child process itself switches user, so
//! the process this harness stops is the server, not a wrapper).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running server; stopped (fast shutdown) on drop.
pub struct PgServer {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

/// The newest installed server's `bin` directory.
pub fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server under /usr/lib/postgresql/*/bin: install Debian's postgresql \
             package (`cargo xtask setup` does)"
        )
    })
}

fn id(args: &[&str]) -> u32 {
    let out = Command::new("id").args(args).output().expect("id");
    assert!(out.status.success(), "id {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a number")
}

fn is_root() -> bool {
    id(&["-u"]) == 0
}

/// `program` run as the user PostgreSQL accepts.
fn pg_command(program: &Path) -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut c = Command::new(program);
    if is_root() {
        c.uid(id(&["-u", "postgres"])).gid(id(&["-g", "postgres"]));
    }
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PgServer {
    /// initdb + postgres, waiting until it accepts connections. `settings` are extra
    /// `-c name=value` server settings.
    pub fn start(settings: &[(&str, &str)]) -> PgServer {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("ukey-pg")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if is_root() {
            use std::os::unix::fs::PermissionsExt as _;
            // The postgres user must reach its directory inside root's temp dir.
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&data)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the PostgreSQL data dir to postgres");
        }
        let out = pg_command(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "ukey",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {out:?}");
        let port = free_port();
        let mut cmd = pg_command(&bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", data.display()))
            .args(["-c", "max_connections=300"]);
        for (k, v) in settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting postgres");
        let server = PgServer {
            dir,
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.psql("postgres", "SELECT 1").is_err() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start:\n{}",
                std::fs::read_to_string(server.dir.path().join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// Runs `sql` with `psql` (PostgreSQL's own client) on database `db`: its rows,
    /// one per line, columns separated by `|`.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(bin_dir().join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "ukey",
            ])
            .args([
                "-d",
                db,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://ukey@127.0.0.1:{}/{db}", self.port)
    }

    /// A new, empty database; its URL.
    pub fn create_db(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        self.url(name)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT: PostgreSQL's fast shutdown.
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The URL of a fresh database for one test, on a server started for it.
pub fn fresh_database(server: &mut Option<PgServer>) -> String {
    let s = server.get_or_insert_with(|| PgServer::start(&[]));
    s.create_db(&format!("t{}", std::process::id()))
}
