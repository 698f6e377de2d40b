//! Job and status-event decoding: any bytes off the queue either decode or give a typed error (the worker
//! terminates and counts those); what decodes encodes back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nio_shared::protocol::{Job, StatusEvent};

fuzz_target!(|body: &[u8]| {
    if let Ok(job) = Job::decode(body) {
        let again = Job::decode(&job.encode()).expect("an encoded job decodes");
        assert_eq!(again, job);
        // the subject and id of a decoded job are built without panicking
        let _ = job.subject();
    }
    if let Ok(ev) = StatusEvent::decode(body) {
        let again = StatusEvent::decode(&ev.encode()).expect("an encoded status event decodes");
        assert_eq!(again, ev);
        let _ = ev.subject();
    }
});
