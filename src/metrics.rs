//! Prometheus metrics, served at `/-/metrics` in the text exposition format
//! (prometheus-client).
//!
//! All updates are atomic increments on handles created once at start, so the request path
//! never takes a lock.

use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use std::sync::{Arc, OnceLock};

use baton_lifecycle::upgrade::Counts;
use baton_lifecycle::workload::Stats;

type Labels = Vec<(&'static str, &'static str)>;

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests answered, indexed by status class (1xx at 0 ... 5xx at 4).
    requests: [Counter; 5],
    /// Requests by protocol: HTTP/1.0, HTTP/1.1, HTTP/2.
    protocols: [Counter; 3],
    /// TLS handshakes that succeeded, and that failed or timed out.
    pub tls_handshakes: Counter,
    pub tls_handshakes_failed: Counter,
    pub open_connections: Gauge,
    upgrades_ok: Counter,
    upgrades_failed: Counter,
    upgrades_rolled_back: Counter,
    /// From the upgrade signal in the old process to the new one serving, in seconds.
    pub last_handoff_seconds: Gauge<f64, AtomicU64>,
    /// How long the previous generation took to drain, in seconds.
    pub last_drain_seconds: Gauge<f64, AtomicU64>,
    /// Connections the previous generations closed forcibly at their drain deadline.
    pub drain_forced_closes: Counter,
    /// Connections closed because their client accepted no byte for `limits.send_timeout`.
    pub send_timeouts: Counter,
    /// Idle keep-alive connections closed to make room for a new client at the limit.
    pub idle_closed_for_room: Counter,
    /// Responses the fast path wrote with sendfile(2) (`crate::server::fast`).
    pub sendfile_responses: Counter,
    /// Responses the fast path wrote, from memory or with sendfile(2).
    pub fast_path_responses: Counter,
    /// Access log lines dropped: the writer's queue was full or a write failed.
    pub access_log_dropped: Counter,
    /// Keep-alive connections this process passed on to the next generation in an upgrade.
    pub connections_passed_on: Counter,
    /// Keep-alive connections this process adopted from the previous generation.
    pub connections_adopted: Counter,
    lifecycle: OnceLock<Arc<Stats>>,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const PROTOCOLS: [&str; 3] = ["HTTP/1.0", "HTTP/1.1", "HTTP/2"];

impl Metrics {
    pub fn new(generation: u64, started: SystemTime) -> Metrics {
        let mut registry = Registry::default();
        let requests_family = Family::<Labels, Counter>::default();
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
        let protocols_family = Family::<Labels, Counter>::default();
        registry.register(
            "baton_http_requests_by_protocol",
            "HTTP requests, by protocol version",
            protocols_family.clone(),
        );
        let protocols = PROTOCOLS.map(|protocol| {
            protocols_family
                .get_or_create(&vec![("protocol", protocol)])
                .clone()
        });
        let handshakes_family = Family::<Labels, Counter>::default();
        registry.register(
            "baton_tls_handshakes",
            "TLS handshakes, by result (failed: refused, broken off or timed out)",
            handshakes_family.clone(),
        );
        let tls_handshakes = handshakes_family
            .get_or_create(&vec![("result", "ok")])
            .clone();
        let tls_handshakes_failed = handshakes_family
            .get_or_create(&vec![("result", "failed")])
            .clone();
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
        let start: Gauge<f64, AtomicU64> = Gauge::default();
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
        let restarts: Counter = Counter::default();
        restarts.inc_by(crate::keeper::restarts_from_env());
        registry.register(
            "baton_restarts",
            "Restarts of a generation that exited without being asked, by the keeper (without systemd)",
            restarts,
        );
        let upgrades = Family::<Labels, Counter>::default();
        registry.register(
            "baton_upgrades",
            "Upgrades by result, over all generations of this service",
            upgrades.clone(),
        );
        let upgrades_ok = upgrades.get_or_create(&vec![("result", "ok")]).clone();
        let upgrades_failed = upgrades.get_or_create(&vec![("result", "failed")]).clone();
        let upgrades_rolled_back = upgrades
            .get_or_create(&vec![("result", "rolled_back")])
            .clone();
        let last_handoff_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "baton_last_handoff_seconds",
            "Duration of the last upgrade: from the signal in the old process until the new one serves",
            last_handoff_seconds.clone(),
        );
        let last_drain_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "baton_last_drain_seconds",
            "How long the previous generation took to drain its connections",
            last_drain_seconds.clone(),
        );
        let drain_forced_closes = Counter::default();
        registry.register(
            "baton_drain_forced_closes",
            "Connections the previous generation closed forcibly at its drain deadline",
            drain_forced_closes.clone(),
        );
        let send_timeouts = Counter::default();
        registry.register(
            "baton_send_timeouts",
            "Connections closed because the client accepted no byte of a response for limits.send_timeout",
            send_timeouts.clone(),
        );
        let idle_closed_for_room = Counter::default();
        registry.register(
            "baton_idle_closed_for_room",
            "Idle keep-alive connections closed to make room for a new client at limits.max_connections",
            idle_closed_for_room.clone(),
        );
        let sendfile_responses = Counter::default();
        registry.register(
            "baton_sendfile_responses",
            "Responses whose body the fast path sent with sendfile (files of 16 KiB or more, unless the cache's fd budget is spent)",
            sendfile_responses.clone(),
        );
        let fast_path_responses = Counter::default();
        registry.register(
            "baton_fast_path_responses",
            "Responses for files written by baton's fast path rather than hyper: files under 16 KiB from memory, larger ones with sendfile",
            fast_path_responses.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "baton_access_log_dropped",
            "Access log lines dropped because the writer's queue was full or a write failed (a full disk, a slow journal)",
            access_log_dropped.clone(),
        );
        let connections_passed_on = Counter::default();
        registry.register(
            "baton_connections_passed_on",
            "Keep-alive connections this process passed on to the next generation in an upgrade, instead of closing them",
            connections_passed_on.clone(),
        );
        let connections_adopted = Counter::default();
        registry.register(
            "baton_connections_adopted",
            "Keep-alive connections this process adopted from the previous generation in an upgrade",
            connections_adopted.clone(),
        );
        Metrics {
            registry,
            requests,
            protocols,
            tls_handshakes,
            tls_handshakes_failed,
            open_connections,
            upgrades_ok,
            upgrades_failed,
            upgrades_rolled_back,
            last_handoff_seconds,
            last_drain_seconds,
            drain_forced_closes,
            send_timeouts,
            idle_closed_for_room,
            sendfile_responses,
            fast_path_responses,
            access_log_dropped,
            connections_passed_on,
            connections_adopted,
            lifecycle: OnceLock::new(),
        }
    }

    /// Sets the upgrade counters carried over from earlier generations.
    pub fn set_upgrades(&self, counts: Counts) {
        for (counter, value) in [
            (&self.upgrades_ok, counts.ok),
            (&self.upgrades_failed, counts.failed),
            (&self.upgrades_rolled_back, counts.rolled_back),
        ] {
            counter.inc_by(value.saturating_sub(counter.get()));
        }
    }

    /// Upgrades so far, by result.
    pub fn upgrades(&self) -> Counts {
        Counts {
            ok: self.upgrades_ok.get(),
            failed: self.upgrades_failed.get(),
            rolled_back: self.upgrades_rolled_back.get(),
        }
    }

    /// Reports the lifecycle's counters (upgrades, handoff and drain times) from `stats`.
    pub fn track(&self, stats: Arc<Stats>) {
        let _ = self.lifecycle.set(stats);
    }

    fn sync_lifecycle(&self) {
        let Some(stats) = self.lifecycle.get() else {
            return;
        };
        self.set_upgrades(stats.upgrades());
        self.last_handoff_seconds.set(stats.last_handoff_seconds());
        self.last_drain_seconds.set(stats.last_drain_seconds());
        let forced = stats.drain_forced_closes();
        self.drain_forced_closes
            .inc_by(forced.saturating_sub(self.drain_forced_closes.get()));
    }

    /// Counts one answered request.
    /// Counts a request of this protocol version.
    pub fn record_version(&self, version: hyper::Version) {
        let i = match version {
            hyper::Version::HTTP_2 => 2,
            hyper::Version::HTTP_11 => 1,
            _ => 0,
        };
        self.protocols[i].inc();
    }

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
        self.sync_lifecycle();
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
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
        assert!(text.contains("baton_send_timeouts_total 0"), "{text}");
        assert!(text.contains("baton_access_log_dropped_total 0"), "{text}");
        assert!(
            text.contains("baton_idle_closed_for_room_total 0"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
