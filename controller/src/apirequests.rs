//! Counts the controller's own Kubernetes API requests by verb, resource and response code, with the labels
//! the apiserver gives them in its `apiserver_request_total`, so what NIO costs a cluster can be read from NIO
//! on any cluster (`nio_controller_api_requests_total`). A request is counted once however kube's client
//! retries it inside (it retries 429 and 503 only); a watch is counted when it starts.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderMap, Method, Request, Response, Uri};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// GET, LIST, WATCH, CREATE, UPDATE, PATCH, APPLY, DELETE, DELETECOLLECTION (as the apiserver names them).
    pub verb: String,
    /// The resource, with its subresource after a slash (`machines/status`); `other` for non-resource paths.
    pub resource: String,
    /// The response's status code, or `error` when no response came.
    pub code: String,
}

/// The tower layer that counts into `requests`.
#[derive(Clone)]
pub struct CountRequests(pub Family<RequestLabels, Counter>);

impl<S> tower::Layer<S> for CountRequests {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted { inner, requests: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    requests: Family<RequestLabels, Counter>,
}

impl<S, B, R> tower::Service<Request<B>> for Counted<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (verb, resource) = classify(req.method(), req.uri(), req.headers());
        let requests = self.requests.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await;
            let code = response.as_ref().map_or_else(|_| "error".to_string(), |r| r.status().as_u16().to_string());
            requests.get_or_create(&RequestLabels { verb: verb.into(), resource, code }).inc();
            response
        })
    }
}

/// The apiserver's verb and resource for a request: `/api/v1/…` or `/apis/GROUP/VERSION/…`, then
/// `namespaces/NS/RESOURCE[/NAME[/SUBRESOURCE]]` or `RESOURCE[/NAME[/SUBRESOURCE]]`.
fn classify(method: &Method, uri: &Uri, headers: &HeaderMap) -> (&'static str, String) {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let rest = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => &[][..],
    };
    let rest = match rest {
        ["namespaces", _ns, r, more @ ..] if !r.is_empty() => {
            let mut v = vec![*r];
            v.extend_from_slice(more);
            v
        }
        other => other.to_vec(),
    };
    let (resource, named) = match rest.as_slice() {
        [] => ("other".to_string(), true),
        [r] => (r.to_string(), false),
        [r, _name] => (r.to_string(), true),
        [r, _name, sub, ..] => (format!("{r}/{sub}"), true),
    };
    let watching = uri.query().is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    let verb = match *method {
        Method::GET if watching => "WATCH",
        Method::GET if named => "GET",
        Method::GET => "LIST",
        Method::POST => "CREATE",
        Method::PUT => "UPDATE",
        Method::PATCH
            if headers
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|c| c.as_bytes().starts_with(b"application/apply-patch")) =>
        {
            "APPLY"
        }
        Method::PATCH => "PATCH",
        Method::DELETE if named => "DELETE",
        Method::DELETE => "DELETECOLLECTION",
        _ => "OTHER",
    };
    (verb, resource)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(method: Method, uri: &str, content_type: Option<&str>) -> (&'static str, String) {
        let mut headers = HeaderMap::new();
        if let Some(c) = content_type {
            headers.insert(http::header::CONTENT_TYPE, c.parse().unwrap());
        }
        classify(&method, &uri.parse().unwrap(), &headers)
    }

    #[test]
    fn requests_are_named_as_the_apiserver_names_them() {
        let m = "/apis/nixos.infra/v1alpha1/namespaces/prod/machines";
        assert_eq!(class(Method::GET, m, None), ("LIST", "machines".into()));
        assert_eq!(
            class(Method::GET, &format!("{m}?watch=true&resourceVersion=5"), None),
            ("WATCH", "machines".into())
        );
        assert_eq!(class(Method::GET, &format!("{m}/m1"), None), ("GET", "machines".into()));
        assert_eq!(class(Method::PUT, &format!("{m}/m1/status"), None), ("UPDATE", "machines/status".into()));
        let apply = Some("application/apply-patch+yaml");
        assert_eq!(
            class(Method::PATCH, &format!("{m}/m1/status?fieldManager=x"), apply),
            ("APPLY", "machines/status".into())
        );
        let merge = Some("application/merge-patch+json");
        assert_eq!(class(Method::PATCH, &format!("{m}/m1"), merge), ("PATCH", "machines".into()));
        assert_eq!(
            class(Method::POST, "/apis/events.k8s.io/v1/namespaces/prod/events", None),
            ("CREATE", "events".into())
        );
        assert_eq!(class(Method::GET, "/api/v1/namespaces/prod/secrets/git", None), ("GET", "secrets".into()));
        // cluster-scoped, across namespaces, and the namespaces themselves
        assert_eq!(
            class(Method::GET, "/apis/nixos.infra/v1alpha1/machines?limit=500", None),
            ("LIST", "machines".into())
        );
        assert_eq!(class(Method::GET, "/api/v1/namespaces/prod", None), ("GET", "namespaces".into()));
        assert_eq!(
            class(Method::DELETE, "/api/v1/namespaces/prod/events", None),
            ("DELETECOLLECTION", "events".into())
        );
        assert_eq!(class(Method::GET, "/version", None), ("GET", "other".into()));
    }
}
