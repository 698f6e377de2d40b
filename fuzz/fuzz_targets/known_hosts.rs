//! known_hosts and pinned host keys from users: parsing never panics, and a key is accepted only when an entry
//! for exactly this host and port carries exactly these key bytes.
#![no_main]

use arbitrary::Arbitrary;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    known_hosts: &'a str,
    host: &'a str,
    port: u16,
    key: &'a [u8],
    pinned: &'a str,
}

fuzz_target!(|i: Input<'_>| {
    if nio_shared::gitauth::host_key_known(i.known_hosts, i.host, i.port, i.key).is_ok() {
        // accepted: some line carries exactly this key (the base64 of its wire bytes) and names this host
        let b64 = base64::engine::general_purpose::STANDARD.encode(i.key);
        let name = if i.port == 22 { i.host.to_string() } else { format!("[{}]:{}", i.host, i.port) };
        assert!(
            i.known_hosts.lines().any(|l| l.contains(&b64) && (l.contains(&name) || l.starts_with("|1|"))),
            "accepted a key no line for {name} carries"
        );
    }
    let pinned = nio_executor::ssh::parse_host_key(i.pinned);
    let checked = nio_shared::validate::host_key("spec.hostKey", i.pinned);
    if checked.is_ok() {
        assert!(pinned.is_ok(), "validation accepted a host key the executor cannot parse: {:?}", i.pinned);
    }
});
