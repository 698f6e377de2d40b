//! The single place where an argument vector becomes the string a remote shell runs.
//!
//! SSH transmits one command string which the remote login shell parses. Every command NIO sends is built as
//! an argument vector and turned into that string here, with POSIX shell quoting from the `shlex` crate, so
//! no user string is ever interpreted by the remote shell.

/// An argument that cannot be passed through a POSIX shell.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuoteError {
    /// The argument vector was empty.
    #[error("empty command")]
    Empty,
    /// An argument contains a NUL byte, which no shell argument can carry.
    #[error("argument {index} contains a NUL byte")]
    Nul { index: usize },
}

/// Quotes `argv` for a POSIX `sh`: the remote shell sees exactly these arguments.
pub fn command<S: AsRef<str>>(argv: &[S]) -> Result<String, QuoteError> {
    if argv.is_empty() {
        return Err(QuoteError::Empty);
    }
    let mut out = String::new();
    for (index, arg) in argv.iter().enumerate() {
        let quoted = shlex::try_quote(arg.as_ref()).map_err(|_| QuoteError::Nul { index })?;
        if index > 0 {
            out.push(' ');
        }
        out.push_str(&quoted);
    }
    Ok(out)
}
