//! Validation of user resources from arbitrary JSON: never panics, and a spec it accepts is one the controller
//! can turn into a job (its flake attribute, durations and selector are usable as validated).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nio_shared::crd::{MachineSpec, NixosConfigurationSpec};
use nio_shared::validate;

fuzz_target!(|body: &[u8]| {
    if let Ok(spec) = serde_json::from_slice::<MachineSpec>(body) {
        if validate::machine_spec(&spec).is_ok()
            && let Some(key) = spec.host_key.as_deref()
        {
            assert!(nio_executor::ssh::parse_host_key(key).is_ok(), "a valid Machine's host key does not parse: {key:?}");
        }
    }
    if let Ok(spec) = serde_json::from_slice::<NixosConfigurationSpec>(body)
        && validate::configuration_spec(&spec).is_ok()
    {
        validate::flake_attr("spec.flake", &spec.flake).expect("a valid configuration's flake has an attribute");
        if let Some(p) = spec.poll_interval.as_deref() {
            validate::duration("spec.pollInterval", p).expect("a valid configuration's pollInterval parses");
        }
    }
});
