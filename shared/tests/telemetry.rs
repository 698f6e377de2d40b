#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! Trace context survives a trip through NATS headers.

use opentelemetry::Context;
use opentelemetry::trace::{
    Span, SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer, TracerProvider,
};

#[test]
fn inject_then_extract_preserves_trace_and_span_ids() {
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let sc = SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        TraceState::from_key_value([("nio", "dc1")]).unwrap(),
    );
    let cx = Context::new().with_remote_span_context(sc.clone());
    let mut headers = async_nats::HeaderMap::new();
    nio_shared::telemetry::inject_context(&cx, &mut headers);
    assert_eq!(
        headers.get("traceparent").map(|v| v.as_str()),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    let back = nio_shared::telemetry::extract(&headers);
    let got = back.span().span_context().clone();
    assert_eq!(got.trace_id(), sc.trace_id());
    assert_eq!(got.span_id(), sc.span_id());
    assert!(got.is_sampled() && got.is_remote());
    assert_eq!(got.trace_state().get("nio"), Some("dc1"));
}

#[test]
fn a_child_span_created_from_extracted_headers_joins_the_trace() {
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let (provider, exporting) = nio_shared::telemetry::tracer_provider("nio-test", &[]).unwrap();
    assert!(!exporting || std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some());
    let tracer = provider.tracer("t");
    let parent = tracer.start("job.publish");
    let parent_cx = Context::new().with_span(parent);
    let mut headers = async_nats::HeaderMap::new();
    nio_shared::telemetry::inject_context(&parent_cx, &mut headers);
    let remote = nio_shared::telemetry::extract(&headers);
    let child = tracer.start_with_context("job.execute", &remote);
    assert_eq!(child.span_context().trace_id(), parent_cx.span().span_context().trace_id());
    assert_ne!(child.span_context().span_id(), parent_cx.span().span_context().span_id());
}

#[test]
fn no_headers_means_no_parent() {
    let headers = async_nats::HeaderMap::new();
    let cx = nio_shared::telemetry::extract(&headers);
    assert!(!cx.span().span_context().is_valid());
}
