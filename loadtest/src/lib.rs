//! NIO without a cluster or machines: the Kubernetes API simulator ([`kubesim`]), and (later) the fleet
//! simulator, load test and demo.
#![forbid(unsafe_code)]

pub mod bench;
pub mod compare;
pub mod ctlbench;
pub mod demo;
pub mod fleet;
pub mod gitrepo;
pub mod gitserve;
pub mod kubesim;
pub mod nats;
pub mod plot;
pub mod procs;
pub mod scenario;
