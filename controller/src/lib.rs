//! Controller library (issue #4).
