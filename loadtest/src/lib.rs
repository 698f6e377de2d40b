//! Load-test, Kubernetes API simulator and fleet simulator (issues #3, #6).
