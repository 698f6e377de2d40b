//! Executor library (issue #5).
