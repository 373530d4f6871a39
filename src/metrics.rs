//! Prometheus metrics, served at `/-/metrics` in the text exposition format
//! (prometheus-client).
//!
//! All updates are atomic increments on handles created once at start, so the request path
//! never takes a lock.

use std::time::SystemTime;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type ClassLabels = Vec<(&'static str, &'static str)>;

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests answered, indexed by status class (1xx at 0 ... 5xx at 4).
    requests: [Counter; 5],
    pub open_connections: Gauge,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl Metrics {
    pub fn new(generation: u64, started: SystemTime) -> Metrics {
        let mut registry = Registry::default();
        let requests_family = Family::<ClassLabels, Counter>::default();
        registry.register(
            "baton_http_requests",
            "HTTP requests answered, by status class",
            requests_family.clone(),
        );
        let requests = CLASSES.map(|class| {
            requests_family
                .get_or_create(&vec![("class", class)])
                .clone()
        });
        let open_connections = Gauge::default();
        registry.register(
            "baton_open_connections",
            "Client connections currently open",
            open_connections.clone(),
        );
        let generation_gauge: Gauge = Gauge::default();
        generation_gauge.set(generation as i64);
        registry.register(
            "baton_generation",
            "Generation of this process: 1 at a fresh start, +1 per upgrade",
            generation_gauge,
        );
        let start: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        start.set(
            started
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        registry.register(
            "baton_process_start_time_seconds",
            "Start time of this process since the Unix epoch",
            start,
        );
        Metrics {
            registry,
            requests,
            open_connections,
        }
    }

    /// Counts one answered request.
    pub fn record_status(&self, status: u16) {
        if let Some(counter) = (status / 100)
            .checked_sub(1)
            .and_then(|i| self.requests.get(usize::from(i)))
        {
            counter.inc();
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Gives access to the registry, so that a library user can add metrics of its own before
    /// serving.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_by_class() {
        let m = Metrics::new(3, SystemTime::UNIX_EPOCH);
        m.record_status(200);
        m.record_status(204);
        m.record_status(404);
        m.record_status(99); // not a status: ignored
        let text = m.render();
        assert!(
            text.contains("baton_http_requests_total{class=\"2xx\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("baton_http_requests_total{class=\"4xx\"} 1"),
            "{text}"
        );
        assert!(text.contains("baton_generation 3"), "{text}");
        assert!(text.contains("baton_open_connections 0"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
