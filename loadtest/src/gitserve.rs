//! Real Git servers on loopback for tests of authenticated remotes: Apache httpd running git's own smart-HTTP
//! server (`git http-backend`) over TLS with HTTP basic authentication, and OpenSSH `sshd` serving
//! `git-upload-pack` to one key. Each lives in its own temporary directory and stops when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::procs::{free_port, keygen, sshd_binary};

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    anyhow::ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_listening(port: u16, log: &Path, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what} did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn stop(child: &mut Child) {
    // SIGTERM lets Apache stop its workers; sshd does the same for its sessions.
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A private certificate authority and a certificate it issued for `127.0.0.1`, made with the `openssl` CLI.
pub struct TestCa {
    /// The CA certificate (what goes into a credentials Secret's `ca.crt`).
    pub ca_pem: Vec<u8>,
    cert: PathBuf,
    key: PathBuf,
}

impl TestCa {
    pub fn create(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let p = |f: &str| dir.join(format!("{name}-{f}"));
        run(Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"])
            .args([
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=NIO test CA {name}"),
                "-keyout",
                &p("ca.key").display().to_string(),
                "-out",
                &p("ca.crt").display().to_string(),
            ]))?;
        run(Command::new("openssl")
            .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"])
            .args([
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                &p("server.key").display().to_string(),
                "-out",
                &p("server.csr").display().to_string(),
            ]))?;
        std::fs::write(p("ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")?;
        run(Command::new("openssl").args(["x509", "-req", "-days", "2", "-CAcreateserial"]).args([
            "-in",
            &p("server.csr").display().to_string(),
            "-CA",
            &p("ca.crt").display().to_string(),
            "-CAkey",
            &p("ca.key").display().to_string(),
            "-extfile",
            &p("ext").display().to_string(),
            "-out",
            &p("server.crt").display().to_string(),
        ]))?;
        Ok(TestCa { ca_pem: std::fs::read(p("ca.crt"))?, cert: p("server.crt"), key: p("server.key") })
    }

    /// The server certificate (for `127.0.0.1` and `localhost`), PEM.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// The server certificate's private key, PEM.
    pub fn key_path(&self) -> &Path {
        &self.key
    }
}

const APACHE_MODULES: [(&str, &str); 11] = [
    ("mpm_prefork_module", "mod_mpm_prefork.so"),
    ("authz_core_module", "mod_authz_core.so"),
    ("authn_core_module", "mod_authn_core.so"),
    ("authn_file_module", "mod_authn_file.so"),
    ("authz_user_module", "mod_authz_user.so"),
    ("auth_basic_module", "mod_auth_basic.so"),
    ("alias_module", "mod_alias.so"),
    ("cgi_module", "mod_cgi.so"),
    ("env_module", "mod_env.so"),
    ("ssl_module", "mod_ssl.so"),
    ("socache_shmcb_module", "mod_socache_shmcb.so"),
];

/// Apache httpd serving the repositories under a directory with `git http-backend`, over HTTPS, to one user.
pub struct HttpsGitServer {
    child: Child,
    pub port: u16,
    /// The CA that issued the server's certificate.
    pub ca: TestCa,
    _dir: tempfile::TempDir,
}

impl HttpsGitServer {
    /// Serves `root` (a directory holding repositories) at `https://127.0.0.1:{port}/git/…` to `users`
    /// (name, password).
    pub fn start(root: &Path, users: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let ca = TestCa::create(d, "https")?;
        let mut htpasswd = String::new();
        for (user, password) in users {
            let hash = run(Command::new("openssl").args(["passwd", "-apr1", password]))?;
            htpasswd.push_str(&format!("{user}:{}\n", hash.trim()));
        }
        std::fs::write(d.join("htpasswd"), htpasswd)?;
        // Apache's workers run as `nobody` when started as root: they must read the configuration and the
        // repositories (which git is told are safe to serve although another user owns them).
        readable_by_all(d)?;
        readable_by_all(root)?;
        let port = free_port()?;
        let modules: String =
            APACHE_MODULES.iter().map(|(m, f)| format!("LoadModule {m} /usr/lib/apache2/modules/{f}\n")).collect();
        let conf = format!(
            "ServerRoot {d}\nServerName 127.0.0.1\nListen 127.0.0.1:{port}\nPidFile {d}/httpd.pid\n\
             ErrorLog {d}/error.log\nLogLevel warn\n{modules}User nobody\nGroup nogroup\nStartServers 2\n\
             SSLSessionCache shmcb:{d}/ssl_scache(512000)\nSSLEngine on\nSSLCertificateFile {cert}\n\
             SSLCertificateKeyFile {key}\nSetEnv GIT_PROJECT_ROOT {root}\nSetEnv GIT_HTTP_EXPORT_ALL 1\n\
             SetEnv GIT_CONFIG_COUNT 1\nSetEnv GIT_CONFIG_KEY_0 safe.directory\nSetEnv GIT_CONFIG_VALUE_0 *\n\
             ScriptAlias /git/ /usr/lib/git-core/git-http-backend/\n\
             <Location /git/>\n  AuthType Basic\n  AuthName git\n  AuthUserFile {d}/htpasswd\n  Require valid-user\n</Location>\n",
            d = d.display(),
            root = root.display(),
            cert = ca.cert.display(),
            key = ca.key.display(),
        );
        std::fs::write(d.join("httpd.conf"), conf)?;
        use std::os::unix::process::CommandExt as _;
        let child = Command::new(apache_binary())
            // Its own process group: on shutdown Apache signals its whole group.
            .process_group(0)
            .args(["-DFOREGROUND", "-f"])
            .arg(d.join("httpd.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("stderr.log"))?)
            .spawn()
            .context("apache2 (install it: make setup)")?;
        let mut server = HttpsGitServer { child, port, ca, _dir: dir };
        wait_listening(port, &server._dir.path().join("stderr.log"), "apache2")?;
        if let Ok(Some(status)) = server.child.try_wait() {
            anyhow::bail!("apache2 exited: {status}");
        }
        Ok(server)
    }

    /// URL of the repository `name` under the served directory.
    pub fn url(&self, name: &str) -> String {
        format!("https://127.0.0.1:{}/git/{name}", self.port)
    }
}

impl Drop for HttpsGitServer {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn apache_binary() -> &'static str {
    if Path::new("/usr/sbin/apache2").exists() { "/usr/sbin/apache2" } else { "apache2" }
}

fn readable_by_all(p: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in walk(p)? {
        let meta = std::fs::symlink_metadata(&entry)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode();
        let add = if meta.is_dir() || mode & 0o100 != 0 { 0o055 } else { 0o044 };
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode | add))?;
    }
    Ok(())
}

fn walk(p: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = vec![p.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if std::fs::symlink_metadata(&out[i])?.is_dir() {
            for e in std::fs::read_dir(&out[i])? {
                out.push(e?.path());
            }
        }
        i += 1;
    }
    Ok(out)
}

/// OpenSSH `sshd` letting one key run `git-upload-pack` (and anything else: it is a test server) as the
/// current user.
pub struct SshGitServer {
    child: Child,
    pub port: u16,
    /// The client's private key (OpenSSH format), what goes into `ssh-privatekey`.
    pub client_key: String,
    /// A `known_hosts` line for the server.
    pub known_hosts: String,
    /// The account the key logs in as (the current user).
    pub user: String,
    _dir: tempfile::TempDir,
}

impl SshGitServer {
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let host_pub = keygen(&d.join("host_key"))?;
        let client_pub = keygen(&d.join("client"))?;
        std::fs::write(d.join("authorized_keys"), format!("{client_pub}\n"))?;
        std::fs::create_dir_all("/run/sshd").ok();
        let port = free_port()?;
        let conf = format!(
            "ListenAddress 127.0.0.1:{port}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nStrictModes no\nPidFile {d}/sshd.pid\nLogLevel ERROR\n",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), conf)?;
        let child = Command::new(sshd_binary())
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("sshd.log"))?)
            .spawn()
            .context("sshd (install openssh-server: make setup)")?;
        let user = run(Command::new("id").arg("-un"))?.trim().to_string();
        let key = host_pub.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        let server = SshGitServer {
            child,
            port,
            client_key: std::fs::read_to_string(d.join("client"))?,
            known_hosts: format!("[127.0.0.1]:{port} {key}\n"),
            user,
            _dir: dir,
        };
        wait_listening(port, &server._dir.path().join("sshd.log"), "sshd")?;
        Ok(server)
    }

    /// `ssh://` URL of the repository at `path` on this machine.
    pub fn url(&self, path: &Path) -> String {
        format!("ssh://{}@127.0.0.1:{}{}", self.user, self.port, path.display())
    }
}

impl Drop for SshGitServer {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}
