//! Controller errors, each with a small fixed category (Event reason, condition reason, metric label).

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("NATS: publishing a job: {0}")]
    Publish(#[from] async_nats::jetstream::context::PublishError),
    #[error("NATS: withdrawing a queued job: {0}")]
    Withdraw(String),
    #[error(transparent)]
    Git(#[from] crate::git::GitError),
    #[error("{0}")]
    Invalid(#[from] nio_shared::validate::Invalid),
    #[error("Secret {namespace}/{name}: {problem}")]
    Secret { namespace: String, name: String, problem: String },
    #[error(
        "Secret {namespace}/{name} has not opted in: NIO reads only Secrets labelled {label}={value} \
         (kubectl label secret -n {namespace} {name} {label}={value})",
        label = nio_shared::crd::SECRET_OPT_IN_LABEL,
        value = nio_shared::crd::SECRET_OPT_IN_VALUE
    )]
    SecretNotPermitted { namespace: String, name: String },
    #[error(
        "{namespace}/{configuration} delivers Secret files (additionalFiles with secretRef) but this controller has \
         no --seal-key-file to seal them with; nothing is published until it has one"
    )]
    NoSealKey { namespace: String, configuration: String },
    #[error("sealing: {0}")]
    Seal(#[from] nio_shared::seal::SealError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Adding or removing the finalizer was refused because the cached configuration was behind the
    /// apiserver's (the patch tests the list it read): a retry from the newer copy follows.
    #[error("the cached configuration was behind the apiserver's when its finalizer was written; retrying")]
    StaleCache,
    #[error("removal is waiting: {0}")]
    RemovalPending(String),
    #[error("cache: {0}")]
    CacheNotReady(&'static str),
}

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeApi",
            Error::Publish(_) | Error::Withdraw(_) => "Nats",
            Error::Git(g) => g.reason(),
            Error::Invalid(_) => "InvalidSpec",
            Error::Secret { .. } => "SecretUnavailable",
            Error::SecretNotPermitted { .. } => "SecretNotPermitted",
            Error::NoSealKey { .. } => "SealKeyMissing",
            Error::Seal(_) => "SealError",
            Error::Finalizer(_) => "Finalizer",
            Error::StaleCache => "StaleCache",
            Error::RemovalPending(_) => "RemovalPending",
            Error::CacheNotReady(_) => "CacheNotReady",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
