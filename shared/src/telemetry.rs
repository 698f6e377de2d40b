//! Logging and tracing set-up, and W3C trace-context propagation over NATS headers.
//!
//! Every process calls [`init`] once and holds the returned guard for its life. Spans always get
//! OpenTelemetry ids (so `traceparent` flows even through processes that export nothing); they are exported
//! by OTLP only when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set, over gRPC or HTTP as `OTEL_EXPORTER_OTLP_PROTOCOL` says (`grpc` or `http/protobuf`, the default).

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::{Error, Result};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// Keeps the tracer provider alive; flushes and shuts it down when dropped or on [`TelemetryGuard::shutdown`].
#[must_use = "telemetry stops when the guard is dropped"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    exporting: bool,
}

impl TelemetryGuard {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Flushes pending spans and stops the exporter. Blocks: call from a blocking thread in async code.
    pub fn shutdown(mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

/// OTLP transport chosen by `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// Reads the OTLP settings from the standard variables: None when no endpoint is set.
pub fn otlp_protocol_from_env() -> Result<Option<OtlpProtocol>> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if var("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() && var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none() {
        return Ok(None);
    }
    let proto = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"));
    match proto.as_deref().map(str::trim) {
        None | Some("http/protobuf") => Ok(Some(OtlpProtocol::HttpProtobuf)),
        Some("grpc") => Ok(Some(OtlpProtocol::Grpc)),
        Some(other) => Err(Error::Telemetry(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported; use grpc or http/protobuf"
        ))),
    }
}

/// Builds the tracer provider for `service_name` with extra resource attributes (cluster, site, executor id).
/// gRPC export needs a Tokio runtime: call from within one.
pub fn tracer_provider(service_name: &str, attributes: &[(&str, String)]) -> Result<(SdkTracerProvider, bool)> {
    let resource = Resource::builder()
        .with_service_name(service_name.to_string())
        .with_attributes(attributes.iter().map(|(k, v)| KeyValue::new(k.to_string(), v.clone())))
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let exporter = match otlp_protocol_from_env()? {
        None => None,
        Some(OtlpProtocol::Grpc) => Some(
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| Error::Telemetry(format!("OTLP gRPC exporter: {e}")))?,
        ),
        Some(OtlpProtocol::HttpProtobuf) => Some(
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .build()
                .map_err(|e| Error::Telemetry(format!("OTLP HTTP exporter: {e}")))?,
        ),
    };
    let exporting = exporter.is_some();
    let builder = match exporter {
        Some(e) => builder.with_batch_exporter(e),
        None => builder,
    };
    Ok((builder.build(), exporting))
}

/// Sets up logging (`RUST_LOG`-style filter, default `info`) and tracing for the process.
pub fn init(service_name: &str, format: LogFormat, attributes: &[(&str, String)]) -> Result<TelemetryGuard> {
    init_with_filter(service_name, format, attributes, "info")
}

/// [`init`] with another default log filter (used when `RUST_LOG` is unset).
pub fn init_with_filter(
    service_name: &str,
    format: LogFormat,
    attributes: &[(&str, String)],
    default_filter: &str,
) -> Result<TelemetryGuard> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let (provider, exporting) = tracer_provider(service_name, attributes)?;
    let tracer = provider.tracer(service_name.to_string());
    global::set_tracer_provider(provider.clone());
    // The log filter applies to log lines only: spans for traces are kept whatever RUST_LOG says, so trace
    // context always propagates.
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // kube-client logs the whole response body (every object of a LIST, Secrets included) at warn when it
    // cannot decode it; the controller reports such failures itself, without the body.
    if let Ok(quiet) = "kube_client::client=error".parse() {
        filter = filter.add_directive(quiet);
    }
    let fmt = match format {
        LogFormat::Human => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter).boxed(),
        LogFormat::Json => {
            tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).with_filter(filter).boxed()
        }
    };
    let spans = tracing_subscriber::filter::Targets::new()
        .with_target("nio_controller", tracing::Level::INFO)
        .with_target("nio_executor", tracing::Level::INFO)
        .with_target("nio_shared", tracing::Level::INFO);
    tracing_subscriber::registry()
        .with(fmt)
        // No busy/idle times (a clock read and a lock on every poll of every instrumented future) and no thread
        // names (a task moves between threads): a span's start, end and attributes say what a trace needs.
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_tracked_inactivity(false)
                .with_threads(false)
                .with_filter(spans),
        )
        .try_init()
        .map_err(|e| Error::Telemetry(format!("a global subscriber is already set: {e}")))?;
    Ok(TelemetryGuard { provider: Some(provider), exporting })
}

struct HeaderInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

struct HeaderExtractor<'a>(&'a async_nats::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        // Only the W3C keys matter to the propagator; NATS header names are not exposed as &str.
        ["traceparent", "tracestate"].into_iter().filter(|k| self.0.get(*k).is_some()).collect()
    }
}

/// Writes `cx` into NATS headers as W3C `traceparent`/`tracestate`.
pub fn inject_context(cx: &Context, headers: &mut async_nats::HeaderMap) {
    global::get_text_map_propagator(|p| p.inject_context(cx, &mut HeaderInjector(headers)));
}

/// Writes the current tracing span's context into NATS headers.
pub fn inject(headers: &mut async_nats::HeaderMap) {
    inject_context(&tracing::Span::current().context(), headers);
}

/// Reads the remote parent context from NATS headers (an empty context when absent).
pub fn extract(headers: &async_nats::HeaderMap) -> Context {
    global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// Makes `span` a child of the context carried in `headers`, if any.
pub fn set_parent_from(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    if let Some(h) = headers {
        let _ = span.set_parent(extract(h));
    }
}

/// Links `span` to the trace context in `headers` (when a span handles several messages: one is its parent,
/// the others are linked, so each message's trace still leads to it).
pub fn link_from(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    use opentelemetry::trace::TraceContextExt;
    if let Some(h) = headers {
        let cx = extract(h);
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            span.add_link(sc);
        }
    }
}
