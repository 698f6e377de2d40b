//! NIO without a cluster or machines: the Kubernetes API simulator ([`kubesim`]), the fleet simulator
//! ([`fleet`]), the load test ([`scenario`]) and the demo; and the real things tests check them against: a
//! real etcd + kube-apiserver ([`realkube`]), nats-server ([`nats`]), Git servers ([`gitserve`]).
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
pub mod netfault;
pub mod plot;
pub mod procs;
pub mod realkube;
pub mod scenario;
pub mod testhost;
pub mod testkube;
