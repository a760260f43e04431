//! Logs and traces, set up the same way in the master and the workers.
//!
//! Logs go to stderr, human-readable or JSON. Traces are exported with OTLP
//! over HTTP (what Jaeger ingests, port 4318) only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set and `OTEL_SDK_DISABLED` is not `true`. The other standard
//! variables are the SDK's: `OTEL_SERVICE_NAME` (else the program's name),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`/`_TIMEOUT`,
//! `OTEL_BSP_*`, `OTEL_TRACES_SAMPLER`/`_ARG`. Otherwise no OpenTelemetry layer exists and the task spans (all
//! under the [`TRACE_TARGET`] target, which the log output never shows) are
//! disabled at their call sites, which costs next to nothing.
//!
//! Sampling: the master samples whole tasks with a parent-based ratio sampler
//! (`spec.telemetry.sampleRatio`, 1.0 unless set) unless `OTEL_TRACES_SAMPLER`
//! names another; the decision is taken once, on a task's root span, and an
//! unsampled task gets no further spans (see [`sampled`]). Workers follow the
//! sampled flag of the `traceparent` they receive ([`parent_sampled`]): a
//! task without a sampled parent gets no span on a worker either.
//!
//! W3C trace context crosses processes in the `traceparent` HTTP header:
//! [`traceparent`] reads it off a span, [`adopt_parent`] puts it on one.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The `tracing` target of every span meant for traces (not for logs).
pub const TRACE_TARGET: &str = "flotilla_trace";
/// The HTTP header carrying W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format `{other}`: expected text or json"
            )),
        }
    }
}

/// When log lines carry ANSI colour codes: `auto` (the default) only when
/// stderr is a terminal and `NO_COLOR` is unset, so logs redirected to a
/// file or a pipe are plain text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogColor {
    #[default]
    Auto,
    Always,
    Never,
}

impl LogColor {
    /// Whether this process's log lines get colours.
    pub fn enabled(self) -> bool {
        use std::io::IsTerminal;
        match self {
            LogColor::Always => true,
            LogColor::Never => false,
            LogColor::Auto => {
                std::io::stderr().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LogColor::Auto => "auto",
            LogColor::Always => "always",
            LogColor::Never => "never",
        }
    }
}

impl std::str::FromStr for LogColor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(LogColor::Auto),
            "always" => Ok(LogColor::Always),
            "never" => Ok(LogColor::Never),
            other => Err(format!(
                "unknown colour mode `{other}`: expected auto, always or never"
            )),
        }
    }
}

/// Keeps the trace exporter alive; flushes it when dropped.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn tracing_enabled(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber. `filter` is an `EnvFilter` directive
/// string (`info`, `flotilla=debug`, ...); `RUST_LOG` wins when set.
/// Text lines get ANSI colours only as `color` says. Traces are exported
/// when the standard `OTEL_EXPORTER_OTLP_*ENDPOINT` variables say where, or
/// else to `otlp_endpoint` (a manifest's setting) when given. `sample_ratio`:
/// the share of root spans (tasks) sampled, by a parent-based ratio sampler;
/// `None` leaves the SDK's default (parent-based, always on). A set
/// `OTEL_TRACES_SAMPLER` wins over both.
pub fn init(
    service: &'static str,
    filter: &str,
    format: LogFormat,
    color: LogColor,
    otlp_endpoint: Option<&str>,
    sample_ratio: Option<f64>,
) -> Telemetry {
    let directives = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => v,
        _ => filter.to_string(),
    };
    let log_filter = EnvFilter::new(format!("{directives},{TRACE_TARGET}=off"));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(color.enabled())
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let provider = otlp_provider(service, otlp_endpoint, sample_ratio);
    let traces = provider.as_ref().map(|p| {
        let targets = tracing_subscriber::filter::Targets::new()
            .with_target(TRACE_TARGET, tracing::Level::TRACE);
        // Each span carries its own attributes only: the layer's extras
        // (source file, module and line, thread ID and name, busy/idle
        // times) describe this program, not the task, and cost five more
        // attributes to build, encode and send per span. Task spans are
        // never entered, so no context is activated on entry either.
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(targets)
    });
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(log_filter))
        .with(traces)
        .try_init();
    Telemetry { provider }
}

fn set(key: &str) -> Option<String> {
    std::env::var(key)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn otlp_provider(
    service: &'static str,
    fallback: Option<&str>,
    sample_ratio: Option<f64>,
) -> Option<SdkTracerProvider> {
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    use opentelemetry_otlp::WithExportConfig;
    let from_env =
        set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let fallback = fallback.map(str::trim).filter(|e| !e.is_empty());
    let endpoint = from_env.clone().or(fallback.map(String::from))?;
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
    if from_env.is_none() {
        // As the SDK does with OTEL_EXPORTER_OTLP_ENDPOINT: the traces path
        // goes after the base URL.
        builder = builder.with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')));
    }
    let exporter = match builder.build() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{service}: cannot export traces to {endpoint}: {e}; tracing stays off");
            return None;
        }
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // The default builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    let mut resource = opentelemetry_sdk::Resource::builder();
    if set("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    let resource = resource.build();
    let mut provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource);
    // The builder's default reads OTEL_TRACES_SAMPLER/_ARG: when set, it wins.
    if let (None, Some(ratio)) = (set("OTEL_TRACES_SAMPLER"), sample_ratio) {
        provider = provider.with_sampler(Sampler::ParentBased(Box::new(
            Sampler::TraceIdRatioBased(ratio.clamp(0.0, 1.0)),
        )));
    }
    Some(provider.build())
}

/// Whether `span` is recorded for export: the sampler's decision, taken now
/// if it was not yet (a disabled span is not).
pub fn sampled(span: &tracing::Span) -> bool {
    use opentelemetry::trace::TraceContextExt;
    !span.is_disabled() && span.context().span().span_context().is_sampled()
}

/// Whether a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`) says
/// its span is sampled (bit 0 of the flags). Malformed: not sampled.
pub fn parent_sampled(traceparent: &str) -> bool {
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    match parts.as_slice() {
        [_version, trace, span, flags, ..] if trace.len() == 32 && span.len() == 16 => {
            u8::from_str_radix(flags, 16).is_ok_and(|f| f & 1 == 1)
        }
        _ => false,
    }
}

/// The span's W3C `traceparent`, when it is being traced.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the remote span named by `traceparent`.
pub fn adopt_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent else { return };
    if span.is_disabled() {
        return;
    }
    let carrier: HashMap<String, String> =
        HashMap::from([(TRACEPARENT.to_string(), tp.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_says_whether_it_is_sampled() {
        let id = "0af7651916cd43dd8448eb211c80319c";
        assert!(parent_sampled(&format!("00-{id}-b7ad6b7169203331-01")));
        assert!(!parent_sampled(&format!("00-{id}-b7ad6b7169203331-00")));
        assert!(parent_sampled(&format!("00-{id}-b7ad6b7169203331-03")));
        assert!(!parent_sampled(&format!("00-{id}-b7ad6b71-01")));
        assert!(!parent_sampled("00-01"));
        assert!(!parent_sampled(""));
        assert!(!parent_sampled(&format!("00-{id}-b7ad6b7169203331-zz")));
    }

    #[test]
    fn colour_modes_parse_and_resolve() {
        assert_eq!("auto".parse::<LogColor>(), Ok(LogColor::Auto));
        assert!(!"never".parse::<LogColor>().unwrap().enabled());
        assert!("always".parse::<LogColor>().unwrap().enabled());
        assert!("sometimes"
            .parse::<LogColor>()
            .unwrap_err()
            .contains("sometimes"));
        for mode in [LogColor::Auto, LogColor::Always, LogColor::Never] {
            assert_eq!(mode.as_str().parse::<LogColor>(), Ok(mode));
        }
    }
}
