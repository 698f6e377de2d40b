//! Validation of every user-supplied string that can reach a machine, a path, a subject or a URL.
//!
//! Each rule returns a [`ValidationError`] naming the field and the rule, so the controller can put it in an
//! `Invalid` condition verbatim. Validation is deliberately strict: a string that passes here is later still
//! passed as one quoted argument, never spliced into a shell string.

use std::fmt;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::{FileValueType, MachineSpec, NixosConfigurationSpec};

/// Longest relative path accepted (configurationSubdir, additionalFiles paths).
pub const MAX_PATH_LEN: usize = 1024;
/// Longest single path component.
pub const MAX_PATH_COMPONENT_LEN: usize = 255;
/// Longest flake attribute path.
pub const MAX_FLAKE_ATTR_LEN: usize = 256;
/// Longest Git URL.
pub const MAX_URL_LEN: usize = 2048;
/// Longest Git ref.
pub const MAX_REF_LEN: usize = 255;
/// Largest inline file content carried in a job.
pub const MAX_INLINE_FILE_BYTES: usize = 256 * 1024;

/// One broken rule on one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// Field path as a user writes it, e.g. `spec.additionalFiles[2].path`.
    pub field: String,
    /// The rule that was broken, phrased so the user knows what to change.
    pub rule: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.rule)
    }
}

impl std::error::Error for ValidationError {}

/// All broken rules of one object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct Invalid(pub Vec<ValidationError>);

impl From<ValidationError> for Invalid {
    fn from(e: ValidationError) -> Self {
        Invalid(vec![e])
    }
}

/// Result of one rule.
pub type Check = Result<(), ValidationError>;

fn fail(field: &str, rule: impl Into<String>) -> Check {
    Err(ValidationError { field: field.to_string(), rule: rule.into() })
}

fn no_control(field: &str, s: &str) -> Check {
    if s.contains('\0') {
        return fail(field, "must not contain NUL bytes");
    }
    if s.chars().any(char::is_control) {
        return fail(field, "must not contain control characters (newlines, tabs, escapes)");
    }
    Ok(())
}

/// Flake reference in a spec: `#attr` or `.#attr`, where attr is a dotted attribute path of plain
/// identifiers. Returns the attribute path.
pub fn flake_attr<'a>(field: &str, s: &'a str) -> Result<&'a str, ValidationError> {
    no_control(field, s)?;
    let attr = s.strip_prefix(".#").or_else(|| s.strip_prefix('#')).ok_or_else(|| ValidationError {
        field: field.to_string(),
        rule: "must be `#attr` or `.#attr` (the repository itself is given by gitRepo)".into(),
    })?;
    attr_path(field, attr)?;
    Ok(attr)
}

/// A dotted attribute path: segments of `[A-Za-z_][A-Za-z0-9_'-]*`.
pub fn attr_path(field: &str, attr: &str) -> Check {
    if attr.is_empty() {
        return fail(field, "attribute name must not be empty");
    }
    if attr.len() > MAX_FLAKE_ATTR_LEN {
        return fail(field, format!("attribute path longer than {MAX_FLAKE_ATTR_LEN} bytes"));
    }
    for seg in attr.split('.') {
        let mut chars = seg.chars();
        let ok_first = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        let ok_rest = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '\''));
        if !ok_first || !ok_rest {
            return fail(
                field,
                "attribute path segments must start with a letter or `_` and contain only letters, digits, `_`, `-`, `'`",
            );
        }
    }
    Ok(())
}

/// A relative path inside a source tree or the secrets directory: not absolute, no `..`, no empty
/// components, no NUL or control characters, bounded length.
pub fn relative_path(field: &str, s: &str) -> Check {
    if s.is_empty() {
        return fail(field, "path must not be empty");
    }
    no_control(field, s)?;
    if s.len() > MAX_PATH_LEN {
        return fail(field, format!("path longer than {MAX_PATH_LEN} bytes"));
    }
    if s.starts_with('/') {
        return fail(field, "path must be relative, not absolute");
    }
    if s.contains('\\') {
        return fail(field, "path must use `/` separators, not `\\`");
    }
    for comp in s.split('/') {
        match comp {
            "" => return fail(field, "path must not contain empty components (`//`) or end with `/`"),
            ".." => return fail(field, "path must not contain `..`"),
            "." => return fail(field, "path must not contain `.` components"),
            c if c.len() > MAX_PATH_COMPONENT_LEN => {
                return fail(field, format!("path component longer than {MAX_PATH_COMPONENT_LEN} bytes"));
            }
            c if c.starts_with('-') => return fail(field, "path components must not start with `-`"),
            _ => {}
        }
    }
    Ok(())
}

/// A directory of the source that a flake reference names (`path:…/src/<commit>/<dir>#attr`): a relative path
/// whose characters a URL path carries as they are. `#` and `?` would end the path (the rest read as the
/// attribute or as parameters), `%` would be decoded, a space is not a URL character: each would build
/// something other than the directory named, or fail with a message about URLs.
pub fn flake_dir(field: &str, s: &str) -> Check {
    relative_path(field, s)?;
    const PUNCT: &str = "-._~!$&'()*+,;=:@/";
    match s.chars().find(|c| !(c.is_ascii_alphanumeric() || PUNCT.contains(*c))) {
        Some(bad) => fail(
            field,
            format!("{bad:?} is not allowed: letters, digits and {PUNCT} only (the path is part of a flake URL)"),
        ),
        None => Ok(()),
    }
}

/// Credentials may go to `repo`: not over plain `http://`, where a token or password would cross the network
/// in cleartext (an anonymous plain-HTTP mirror is fine).
pub fn credentials_over(field: &str, repo: &str) -> Check {
    if repo.get(..7).is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://")) {
        return fail(
            field,
            "credentials are not sent over plain http:// (they would cross the network in cleartext); use https://",
        );
    }
    Ok(())
}

/// Git repository URL: scheme in https/http/ssh/git/file (or scp-like `user@host:path`), no password or
/// token in the URL, nothing that git could read as an option.
pub fn git_repo(field: &str, s: &str) -> Check {
    if s.is_empty() {
        return fail(field, "repository URL must not be empty");
    }
    no_control(field, s)?;
    if s.len() > MAX_URL_LEN {
        return fail(field, format!("repository URL longer than {MAX_URL_LEN} bytes"));
    }
    if s.starts_with('-') {
        return fail(field, "repository URL must not start with `-`");
    }
    if s.chars().any(char::is_whitespace) {
        return fail(field, "repository URL must not contain whitespace");
    }
    if s.split('/').next().is_some_and(|head| head.contains("::")) {
        // git's remote-helper syntax (`ext::cmd`, `fd::…`) runs programs; never a plain repository
        return fail(field, "remote-helper syntax `transport::address` is not allowed; use https, ssh, git or file");
    }
    if !s.contains("://") {
        // scp-like syntax: [user@]host:path
        let Some((userhost, path)) = s.split_once(':') else {
            return fail(
                field,
                "repository must be a URL with scheme https, http, ssh, git or file, or `user@host:path`",
            );
        };
        let host = userhost.rsplit_once('@').map_or(userhost, |(_, h)| h);
        if host.is_empty() || path.is_empty() || hostname(field, host).is_err() {
            return fail(field, "scp-like repository must look like `git@host:org/repo.git`");
        }
        if userhost.matches('@').count() > 1 {
            return fail(field, "repository URL must not embed credentials");
        }
        return Ok(());
    }
    let url = match url::Url::parse(s) {
        Ok(u) => u,
        Err(e) => return fail(field, format!("not a valid URL: {e}")),
    };
    match url.scheme() {
        "https" | "http" | "ssh" | "git" | "file" => {}
        other => {
            return fail(field, format!("scheme `{other}` is not allowed; use https, http, ssh, git or file"));
        }
    }
    if url.password().is_some() {
        return fail(field, "repository URL must not embed credentials; use credentialsRef");
    }
    if matches!(url.scheme(), "https" | "http") && !url.username().is_empty() {
        return fail(field, "repository URL must not embed credentials; use credentialsRef");
    }
    if url.scheme() != "file" && url.host_str().is_none_or(str::is_empty) {
        return fail(field, "repository URL needs a host");
    }
    if url.host_str().is_some_and(|h| h.starts_with('-')) || url.username().starts_with('-') {
        // a transport would take `-oProxyCommand=…` for an option
        return fail(field, "repository host and user must not start with `-`");
    }
    Ok(())
}

/// Git ref: branch, tag or full SHA, following `git check-ref-format` rules.
pub fn git_ref(field: &str, s: &str) -> Check {
    if s.is_empty() {
        return fail(field, "ref must not be empty");
    }
    no_control(field, s)?;
    if s.len() > MAX_REF_LEN {
        return fail(field, format!("ref longer than {MAX_REF_LEN} bytes"));
    }
    if s.starts_with('-') || s.starts_with('/') || s.ends_with('/') || s.ends_with('.') || s.ends_with(".lock") {
        return fail(field, "ref must not start with `-` or `/`, or end with `/`, `.` or `.lock`");
    }
    if s.contains("..") || s.contains("//") || s.contains("@{") || s == "@" {
        return fail(field, "ref must not contain `..`, `//` or `@{`");
    }
    if s.chars().any(|c| c == ' ' || matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\')) {
        return fail(field, "ref must not contain spaces or any of ~ ^ : ? * [ \\");
    }
    Ok(())
}

/// Whether a ref is a full commit SHA (used as is after an existence check).
pub fn is_full_sha(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// DNS host name (RFC 1123) or an IPv4/IPv6 address.
pub fn hostname(field: &str, s: &str) -> Check {
    if s.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if s.is_empty() || s.len() > 253 {
        return fail(field, "host name must be 1-253 characters");
    }
    for label in s.split('.') {
        let bytes = label.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= 63
            && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            && bytes.first() != Some(&b'-')
            && bytes.last() != Some(&b'-');
        if !ok {
            return fail(
                field,
                "host name labels must be 1-63 letters, digits or `-`, not starting or ending with `-` (or use an IP address)",
            );
        }
    }
    Ok(())
}

/// An IP address (v4 or v6).
pub fn ip_address(field: &str, s: &str) -> Check {
    match s.parse::<IpAddr>() {
        Ok(_) => Ok(()),
        Err(_) => fail(field, "must be an IPv4 or IPv6 address"),
    }
}

/// DNS-1123 label: lowercase letters, digits and `-`, 1-63 characters. Used for sites, cluster names,
/// namespaces: all become NATS subject tokens.
pub fn dns_label(field: &str, s: &str) -> Check {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        fail(field, "must be a DNS-1123 label: 1-63 lowercase letters, digits or `-`, not starting or ending with `-`")
    }
}

/// DNS-1123 subdomain: dot-separated labels, at most 253 characters. Kubernetes object names.
pub fn dns_subdomain(field: &str, s: &str) -> Check {
    if s.is_empty() || s.len() > 253 {
        return fail(field, "must be a DNS-1123 subdomain of 1-253 characters");
    }
    for label in s.split('.') {
        if dns_label(field, label).is_err() {
            return fail(
                field,
                "must be a DNS-1123 subdomain: lowercase letters, digits, `-` and `.`, each part starting and ending with a letter or digit",
            );
        }
    }
    Ok(())
}

/// Name of an SSH identity held by the executors (a file name in the identities directory).
pub fn identity_name(field: &str, s: &str) -> Check {
    dns_subdomain(field, s)
}

/// Site name: a DNS-1123 label (it becomes a NATS subject token and a consumer name).
pub fn site_name(field: &str, s: &str) -> Check {
    dns_label(field, s)
}

/// Key in a Secret's data: `[-._a-zA-Z0-9]+`, at most 253 characters, not `.` or `..`.
pub fn secret_key(field: &str, s: &str) -> Check {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok { Ok(()) } else { fail(field, "Secret keys are 1-253 characters of letters, digits, `-`, `_`, `.`") }
}

/// POSIX user name for SSH logins.
pub fn ssh_user(field: &str, s: &str) -> Check {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        fail(field, "user names are 1-32 lowercase letters, digits, `_` or `-`, starting with a letter or `_`")
    }
}

/// Public host-key algorithms accepted for pinning (the type word of an OpenSSH public key line).
pub const HOST_KEY_ALGORITHMS: &[&str] =
    &["ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa"];

/// OpenSSH public key line: `algorithm base64 [comment]`, parsed by the same library the executor pins keys
/// with, so a key that validates is a key the executor can compare against (found by fuzzing: a blob holding
/// only the algorithm name used to pass here and fail every job).
pub fn host_key(field: &str, s: &str) -> Check {
    no_control(field, s)?;
    let mut parts = s.split_whitespace();
    let (Some(algo), Some(_)) = (parts.next(), parts.next()) else {
        return fail(field, "host key must be an OpenSSH public key line: `ssh-ed25519 AAAA...`");
    };
    if !HOST_KEY_ALGORITHMS.contains(&algo) {
        return fail(
            field,
            format!("host key algorithm `{algo}` is not supported; use ssh-ed25519, ecdsa-sha2-* or ssh-rsa"),
        );
    }
    match ssh_key::PublicKey::from_openssh(s.trim()) {
        Ok(_) => Ok(()),
        Err(e) => fail(field, format!("host key is not a valid `{algo}` public key: {e}")),
    }
}

/// Go-style duration used by pollInterval: one or more `<n><unit>` with unit ms, s, m or h.
pub fn duration(field: &str, s: &str) -> Result<std::time::Duration, ValidationError> {
    let err =
        || ValidationError { field: field.to_string(), rule: "must be a duration like `30s`, `5m` or `1h30m`".into() };
    if s.is_empty() || s.len() > 32 {
        return Err(err());
    }
    let mut total = std::time::Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (std::time::Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (std::time::Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (std::time::Duration::from_secs(60), 1)
        } else if rest.starts_with('h') {
            (std::time::Duration::from_secs(3600), 1)
        } else {
            return Err(err());
        };
        rest = &rest[len..];
        let part = unit.checked_mul(u32::try_from(n).map_err(|_| err())?).ok_or_else(err)?;
        total = total.checked_add(part).ok_or_else(err)?;
    }
    Ok(total)
}

/// Smallest accepted pollInterval: polling a Git remote faster than this is abuse of the remote.
pub const MIN_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Collects every broken rule of an object.
#[derive(Default)]
struct Collector(Vec<ValidationError>);

impl Collector {
    fn check(&mut self, r: Check) {
        if let Err(e) = r {
            self.0.push(e);
        }
    }
    fn merge(&mut self, r: Result<(), Invalid>) {
        if let Err(Invalid(errors)) = r {
            self.0.extend(errors);
        }
    }
    fn finish(self) -> Result<(), Invalid> {
        if self.0.is_empty() { Ok(()) } else { Err(Invalid(self.0)) }
    }
}

/// Validates a Machine spec; every broken rule is reported.
pub fn machine_spec(spec: &MachineSpec) -> Result<(), Invalid> {
    let mut c = Collector::default();
    c.check(hostname("spec.hostname", &spec.hostname));
    if let Some(ip) = &spec.ip_address {
        c.check(ip_address("spec.ipAddress", ip));
    }
    if spec.port == 0 {
        c.check(fail("spec.port", "port must be 1-65535"));
    }
    c.check(ssh_user("spec.sshUser", &spec.ssh_user));
    c.check(site_name("spec.site", &spec.site));
    if let Some(id) = &spec.credential_ref {
        c.check(identity_name("spec.credentialRef", id));
    }
    if let Some(k) = &spec.host_key {
        c.check(host_key("spec.hostKey", k));
    }
    c.finish()
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63 characters, alphanumeric
/// at both ends, with `-`, `_` and `.` inside (what the apiserver accepts).
pub fn label_key(field: &str, key: &str) -> Check {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && dns_subdomain(field, p).is_err()
    {
        return fail(field, format!("label key {key:?}: the prefix must be a DNS subdomain"));
    }
    if name.is_empty() || !label_value_chars(name) {
        return fail(
            field,
            format!("label key {key:?}: name must be 1-63 characters, alphanumeric at both ends, with - _ . inside"),
        );
    }
    Ok(())
}

fn label_value_chars(v: &str) -> bool {
    v.len() <= 63
        && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && v.chars().next().is_none_or(|c| c.is_ascii_alphanumeric())
        && v.chars().last().is_none_or(|c| c.is_ascii_alphanumeric())
}

/// A label value: empty, or at most 63 characters, alphanumeric at both ends, with `-`, `_` and `.` inside.
pub fn label_value(field: &str, v: &str) -> Check {
    if label_value_chars(v) {
        Ok(())
    } else {
        fail(field, format!("label value {v:?}: at most 63 characters, alphanumeric at both ends, - _ . inside"))
    }
}

/// A label selector as the apiserver reads it: valid keys and values, and an operator it knows (an unknown
/// operator must never quietly select another set of machines).
pub fn label_selector(field: &str, sel: &LabelSelector) -> Result<(), Invalid> {
    let mut c = Collector::default();
    for (k, v) in sel.match_labels.iter().flatten() {
        c.check(label_key(&format!("{field}.matchLabels"), k));
        c.check(label_value(&format!("{field}.matchLabels[{k}]"), v));
    }
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        c.check(label_key(&format!("{f}.key"), &e.key));
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" | "NotIn" => {
                if values.is_empty() {
                    c.check(fail(&format!("{f}.values"), "In and NotIn need at least one value"));
                }
                for (j, v) in values.iter().enumerate() {
                    c.check(label_value(&format!("{f}.values[{j}]"), v));
                }
            }
            "Exists" | "DoesNotExist" => {
                if !values.is_empty() {
                    c.check(fail(&format!("{f}.values"), "Exists and DoesNotExist take no values"));
                }
            }
            other => c.check(fail(
                &format!("{f}.operator"),
                format!("unknown operator {other:?}; use In, NotIn, Exists or DoesNotExist"),
            )),
        }
    }
    c.finish()
}

/// Validates a NixosConfiguration spec; every broken rule is reported.
pub fn configuration_spec(spec: &NixosConfigurationSpec) -> Result<(), Invalid> {
    let mut c = Collector::default();
    c.check(git_repo("spec.gitRepo", &spec.git_repo));
    c.check(git_ref("spec.ref", &spec.git_ref));
    if let Some(name) = &spec.credentials_ref {
        c.check(dns_subdomain("spec.credentialsRef", name));
        c.check(credentials_over("spec.credentialsRef", &spec.git_repo));
    }
    c.check(flake_attr("spec.flake", &spec.flake).map(|_| ()));
    if let Some(sub) = &spec.configuration_subdir {
        c.check(flake_dir("spec.configurationSubdir", sub));
    }
    match (&spec.machine_ref, &spec.machine_selector) {
        (Some(name), None) => c.check(dns_subdomain("spec.machineRef", name)),
        (None, Some(sel)) => c.merge(label_selector("spec.machineSelector", sel)),
        (Some(_), Some(_)) => c.check(fail("spec.machineRef", "set either machineRef or machineSelector, not both")),
        (None, None) => c.check(fail("spec.machineRef", "set machineRef (one machine) or machineSelector (a fleet)")),
    }
    if let Some(f) = &spec.on_remove_flake {
        c.check(flake_attr("spec.onRemoveFlake", f).map(|_| ()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, file) in spec.additional_files.iter().enumerate() {
        let field = format!("spec.additionalFiles[{i}]");
        c.check(relative_path(&format!("{field}.path"), &file.path));
        if !seen.insert((file.value_type == FileValueType::SecretRef, file.path.as_str())) {
            c.check(fail(&format!("{field}.path"), "path is given twice"));
        }
        match file.value_type {
            FileValueType::Inline => match &file.inline {
                None => c.check(fail(&format!("{field}.inline"), "valueType Inline needs `inline` content")),
                Some(s) if s.len() > MAX_INLINE_FILE_BYTES => c.check(fail(
                    &format!("{field}.inline"),
                    format!("inline content larger than {MAX_INLINE_FILE_BYTES} bytes"),
                )),
                Some(_) => {}
            },
            FileValueType::SecretRef => match &file.secret_ref {
                None => {
                    c.check(fail(&format!("{field}.secretRef"), "valueType SecretRef needs `secretRef` {name, key}"))
                }
                Some(r) => {
                    c.check(dns_subdomain(&format!("{field}.secretRef.name"), &r.name));
                    c.check(secret_key(&format!("{field}.secretRef.key"), &r.key));
                }
            },
            FileValueType::NixosFacter => {}
        }
        if file.value_type != FileValueType::Inline && file.inline.is_some() {
            c.check(fail(&format!("{field}.inline"), "`inline` is only used with valueType Inline"));
        }
        if file.value_type != FileValueType::SecretRef && file.secret_ref.is_some() {
            c.check(fail(&format!("{field}.secretRef"), "`secretRef` is only used with valueType SecretRef"));
        }
        for (name, value) in [("owner", &file.owner), ("group", &file.group)] {
            let Some(v) = value else { continue };
            if file.value_type != FileValueType::SecretRef {
                c.check(fail(&format!("{field}.{name}"), "is only used with valueType SecretRef"));
            }
            let ok = (1..=32).contains(&v.len())
                && v.starts_with(|ch: char| ch.is_ascii_lowercase() || ch == '_')
                && v.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_' || ch == '-');
            if !ok {
                c.check(fail(&format!("{field}.{name}"), "must be a user or group name (a-z, 0-9, `_`, `-`)"));
            }
        }
        if let Some(m) = &file.mode {
            if file.value_type != FileValueType::SecretRef {
                c.check(fail(&format!("{field}.mode"), "is only used with valueType SecretRef"));
            }
            let digits = m.strip_prefix('0').filter(|d| d.len() == 3).unwrap_or(m);
            if digits.len() != 3 || !digits.chars().all(|ch| ('0'..='7').contains(&ch)) {
                c.check(fail(&format!("{field}.mode"), "must be an octal mode such as \"0440\""));
            }
        }
    }
    if let Some(hc) = &spec.health_check {
        for (i, arg) in hc.command.iter().enumerate() {
            c.check(no_control(&format!("spec.healthCheck.command[{i}]"), arg));
        }
        if hc.timeout_seconds == 0 {
            c.check(fail("spec.healthCheck.timeoutSeconds", "must be at least 1"));
        }
        for (i, unit) in hc.allowed_failed_units.iter().enumerate() {
            let ok = !unit.is_empty()
                && unit.len() <= 256
                && unit.chars().all(|ch| ch.is_ascii_alphanumeric() || ":_.@-".contains(ch));
            if !ok {
                let field = format!("spec.healthCheck.allowedFailedUnits[{i}]");
                c.check(fail(&field, "must be a systemd unit name (letters, digits, `:_.@-`)"));
            }
        }
    }
    if !(5..=3600).contains(&spec.confirm_timeout_seconds) {
        c.check(fail("spec.confirmTimeoutSeconds", "must be between 5 and 3600"));
    }
    if let Some(p) = &spec.poll_interval {
        match duration("spec.pollInterval", p) {
            Ok(d) if d < MIN_POLL_INTERVAL => c.check(fail("spec.pollInterval", "must be at least 5s")),
            Ok(_) => {}
            Err(e) => c.check(Err(e)),
        }
    }
    c.merge(rollout(&spec.rollout));
    c.finish()
}

/// The rollout policy: limits, budgets and waves.
fn rollout(r: &crate::crd::RolloutSpec) -> Result<(), Invalid> {
    let mut c = Collector::default();
    if r.max_parallel == Some(0) {
        c.check(fail("spec.rollout.maxParallel", "must be at least 1"));
    }
    if let Some(v) = &r.max_failures {
        c.check(count_or_percent("spec.rollout.maxFailures", v));
    }
    let mut budget_names = std::collections::BTreeSet::new();
    for (i, b) in r.disruption_budgets.iter().enumerate() {
        let field = format!("spec.rollout.disruptionBudgets[{i}]");
        c.check(dns_label(&format!("{field}.name"), &b.name));
        if !budget_names.insert(b.name.as_str()) {
            c.check(fail(&format!("{field}.name"), "budget names must be unique"));
        }
        if let Some(sel) = &b.selector {
            c.merge(label_selector(&format!("{field}.selector"), sel));
        }
        c.check(count_or_percent(&format!("{field}.maxUnavailable"), &b.max_unavailable));
        if matches!(&b.max_unavailable, IntOrString::Int(0)) {
            c.check(fail(&format!("{field}.maxUnavailable"), "must be at least 1"));
        }
        if let Some(l) = &b.per_label {
            let ok =
                !l.is_empty() && l.len() <= 63 && l.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_./".contains(ch));
            if !ok {
                c.check(fail(&format!("{field}.perLabel"), "must be a label key"));
            }
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, w) in r.waves.iter().enumerate() {
        let field = format!("spec.rollout.waves[{i}]");
        c.check(dns_label(&format!("{field}.name"), &w.name));
        if !names.insert(w.name.as_str()) {
            c.check(fail(&format!("{field}.name"), "wave names must be unique"));
        }
        if let Some(sel) = &w.selector {
            c.merge(label_selector(&format!("{field}.selector"), sel));
        }
        for (key, v) in [("count", &w.count), ("maxUnavailable", &w.max_unavailable), ("maxFailures", &w.max_failures)]
        {
            if let Some(v) = v {
                c.check(count_or_percent(&format!("{field}.{key}"), v));
            }
        }
        if matches!(&w.count, Some(IntOrString::Int(0))) {
            c.check(fail(&format!("{field}.count"), "must be at least 1"));
        }
        if let Some(soak) = &w.soak {
            c.check(duration(&format!("{field}.soak"), soak).map(|_| ()));
        }
        if let Some(a) = &w.analysis {
            if let Err(e) = crate::analysis::Condition::parse(&a.success_condition) {
                c.check(fail(&format!("{field}.analysis.successCondition"), e));
            }
            if a.query.trim().is_empty() {
                c.check(fail(&format!("{field}.analysis.query"), "must not be empty"));
            }
            c.check(no_control(&format!("{field}.analysis.query"), &a.query));
            if let Some(i) = &a.interval {
                match duration(&format!("{field}.analysis.interval"), i) {
                    Ok(d) if d < std::time::Duration::from_secs(1) => {
                        c.check(fail(&format!("{field}.analysis.interval"), "must be at least 1s"));
                    }
                    Ok(_) => {}
                    Err(e) => c.check(Err(e)),
                }
            }
        }
    }
    c.finish()
}

/// A number (0 or more) or a percentage `N%` (0 to 100).
fn count_or_percent(field: &str, v: &IntOrString) -> Check {
    match v {
        IntOrString::Int(n) if *n >= 0 => Ok(()),
        IntOrString::Int(_) => fail(field, "must not be negative"),
        IntOrString::String(s) => match s.strip_suffix('%').map(str::parse::<u32>) {
            Some(Ok(p)) if p <= 100 => Ok(()),
            _ => fail(field, format!("{s:?} is neither a number nor a percentage like \"10%\"")),
        },
    }
}
