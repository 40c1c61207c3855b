//! `GET /metrics`: the vsock device's counters and connections in the Prometheus text format,
//! encoded by `prometheus-client`. Every metric is in docs/metrics.md.
//!
//! A scrape reads the counters and takes one connection snapshot (a message to the device
//! thread, answered between two batches, as `GET /api/v1/vsock/connections` does) and encodes
//! them; nothing is kept between scrapes. Bytes count the connections that ended plus the live
//! ones of the snapshot. The body is OpenMetrics text when the scraper's `Accept` asks for it
//! (with its `# EOF`), else the same lines as Prometheus text 0.0.4.

use std::collections::BTreeMap;
use std::fmt::{self, Write};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::control::{ConnectionInfo, VsockControl, VsockInfo};

/// `Content-Type` of the Prometheus text format 0.0.4.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// `Content-Type` of the OpenMetrics text format.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connection paths and states, all reported (zero included) so a query never misses a series.
const PATHS: [&str; 3] = ["host", "sibling", "uplink"];
const STATES: [&str; 4] = ["local_init", "connecting", "established", "killed"];
const TYPES: [&str; 2] = ["stream", "seqpacket"];

/// The body and its content type for a scrape whose `Accept` header is `accept`.
pub fn render(vsock: &dyn VsockControl, accept: Option<&str>) -> (&'static str, String) {
    let openmetrics = accept.is_some_and(|a| a.contains("application/openmetrics-text"));
    let scrape = Scrape {
        info: vsock.info(),
        conns: vsock.connections(),
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut body = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug of ours, and the
    // scrape then says so instead of serving half a body.
    let encoded = encode_registry(&mut body, &registry).and_then(|()| {
        if openmetrics {
            encode_eof(&mut body)
        } else {
            Ok(())
        }
    });
    if let Err(e) = encoded {
        body.clear();
        let _ = writeln!(body, "# cannot encode the metrics: {e}");
    }
    let kind = if openmetrics {
        OPENMETRICS_TEXT
    } else {
        PROMETHEUS_TEXT
    };
    (kind, body)
}

/// One scrape's data.
#[derive(Debug)]
struct Scrape {
    info: VsockInfo,
    conns: Vec<ConnectionInfo>,
}

impl Scrape {
    fn activity(&self, name: &str) -> u64 {
        self.info.counters.activity.get(name).copied().unwrap_or(0)
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A counter family with one label, one sample per `(value, count)`.
fn labelled<'a>(
    e: &mut DescriptorEncoder,
    (name, help): (&str, &str),
    label: &str,
    samples: impl IntoIterator<Item = (&'a str, u64)>,
) -> fmt::Result {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, v) in samples {
        let labels = [(label, value)];
        ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A map's entries as `labelled` samples.
fn entries(map: &BTreeMap<String, u64>) -> impl Iterator<Item = (&str, u64)> {
    map.iter().map(|(k, v)| (k.as_str(), *v))
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let c = &self.info.counters;
        labelled(
            &mut e,
            (
                "vsock_guest_connections",
                "Connections the guest opened, by where the router sent them (uplink: the g2h \
                 fallback was taken; refused: answered with RST, e.g. strict mode).",
            ),
            "route",
            [
                ("host", c.host),
                ("sibling", c.sibling),
                ("uplink", c.uplink),
                ("refused", c.refused),
            ],
        )?;
        counter(
            &mut e,
            "vsock_host_connections",
            "Connections the host side opened to the guest (host clients, siblings, listen=).",
            self.activity("incoming"),
        )?;
        let mut family = e.encode_descriptor(
            "vsock_connections",
            "Live connections by path, state and socket type.",
            None,
            MetricType::Gauge,
        )?;
        for path in PATHS {
            for state in STATES {
                for ty in TYPES {
                    let n = self
                        .conns
                        .iter()
                        .filter(|x| x.path == path && x.state == state && x.sock_type == ty)
                        .count();
                    let labels = [("path", path), ("state", state), ("type", ty)];
                    ConstGauge::new(n as i64).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        labelled(
            &mut e,
            (
                "vsock_ended_connections",
                "Connections that ended, by socket type.",
            ),
            "type",
            [
                ("stream", self.activity("ended_stream_conns")),
                ("seqpacket", self.activity("ended_seqpacket_conns")),
            ],
        )?;
        let live_msgs_up: u64 = self.conns.iter().map(|x| x.messages_to_host).sum();
        let live_msgs_down: u64 = self.conns.iter().map(|x| x.messages_to_guest).sum();
        labelled(
            &mut e,
            (
                "vsock_messages",
                "Whole SOCK_SEQPACKET messages the device moved, guest to host side (to_host) \
                 and back (to_guest); relayed sibling connections are not counted.",
            ),
            "direction",
            [
                (
                    "to_host",
                    self.activity("ended_messages_to_host")
                        .saturating_add(live_msgs_up),
                ),
                (
                    "to_guest",
                    self.activity("ended_messages_to_guest")
                        .saturating_add(live_msgs_down),
                ),
            ],
        )?;
        let live_up: u64 = self.conns.iter().map(|x| x.bytes_to_host).sum();
        let live_down: u64 = self.conns.iter().map(|x| x.bytes_to_guest).sum();
        labelled(
            &mut e,
            (
                "vsock_bytes",
                "Payload bytes moved, guest to host side (to_host) and back (to_guest).",
            ),
            "direction",
            [
                (
                    "to_host",
                    self.activity("ended_bytes_to_host").saturating_add(live_up),
                ),
                (
                    "to_guest",
                    self.activity("ended_bytes_to_guest")
                        .saturating_add(live_down),
                ),
            ],
        )?;
        labelled(
            &mut e,
            (
                "vsock_packets",
                "Packets the device took from the TX queue and put in the RX queue.",
            ),
            "queue",
            [
                ("tx", self.activity("tx_packets")),
                ("rx", self.activity("rx_packets")),
            ],
        )?;
        labelled(
            &mut e,
            (
                "vsock_rst_sent",
                "RST packets the device sent the guest, by reason (docs/metrics.md).",
            ),
            "reason",
            entries(&c.rst_sent),
        )?;
        labelled(
            &mut e,
            (
                "vsock_rst_received",
                "RST packets the guest sent, by the state of the connection they ended.",
            ),
            "state",
            entries(&c.rst_received),
        )?;
        for (name, key, help) in [
            (
                "vsock_interrupts",
                "interrupts",
                "Interrupts the device raised (one per batch at most).",
            ),
            (
                "vsock_tx_coalesced_packets",
                "tx_coalesced",
                "TX packets whose payload went to the host in one write with the packet before it.",
            ),
            (
                "vsock_credit_stalls",
                "credit_stalls",
                "Times host bytes waited for guest credit (the guest's receive buffer was full).",
            ),
            (
                "vsock_rx_queue_full",
                "rx_queue_full",
                "Times the device had packets for the guest and found no RX buffer.",
            ),
            (
                "vsock_host_dropped",
                "host_dropped",
                "Connections whose host peer stopped receiving while guest bytes were owed to it.",
            ),
            (
                "vsock_device_wakeups",
                "wakeups",
                "Wake-ups of the device's loop.",
            ),
        ] {
            counter(&mut e, name, help, self.activity(key))?;
        }
        let busy = ConstCounter::new(self.activity("busy_ns") as f64 / 1e9);
        busy.encode(e.encode_descriptor(
            "vsock_device_busy_seconds",
            "Time the device's loop spent working, not waiting.",
            None,
            busy.metric_type(),
        )?)?;
        labelled(
            &mut e,
            (
                "vsock_errors",
                "Guest misbehaviour, refusals and failures by kind (docs/metrics.md).",
            ),
            "kind",
            entries(&c.errors),
        )?;
        let mut family = e.encode_descriptor(
            "vsock_handshakes",
            "Host-side clients by socket (host: the hybrid socket, host_seqpacket: its \
             SOCK_SEQPACKET twin, registry: sibling VMMs and programs, registry_seqpacket) and \
             result: completed, rejected (bad or wrong-kind line, gone before its end), timed_out, \
             over_limit (closed for a newer client when too many were mid-handshake).",
            None,
            MetricType::Counter,
        )?;
        for (socket, counts) in &c.handshakes {
            for result in ["completed", "rejected", "timed_out", "over_limit"] {
                let v = counts.get(result).copied().unwrap_or(0);
                let labels = [("socket", socket.as_str()), ("result", result)];
                ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
            }
        }
        let paused = c.handshakes.iter().map(|(socket, counts)| {
            let n = counts.get("accept_paused").copied().unwrap_or(0);
            (socket.as_str(), n)
        });
        labelled(
            &mut e,
            (
                "vsock_accept_paused",
                "Times a listening socket paused for 100 ms because accept() ran out of file \
                 descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM).",
            ),
            "socket",
            paused.chain([("listen", c.listen_accept_paused)]),
        )?;
        counter(
            &mut e,
            "vsock_uplink_attempts",
            "Connects tried on the G2H uplink (fallback taken; none in strict mode).",
            c.uplink_attempts,
        )?;
        gauge(
            &mut e,
            "vsock_g2h_fallback",
            "1 while connections to unknown CIDs fall back to the uplink, 0 in strict mode.",
            i64::from(self.info.g2h_fallback),
        )?;
        gauge(
            &mut e,
            "vsock_guest_cid",
            "The guest's CID.",
            self.info.cid as i64,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::api::control::VsockCounters;

    struct Fixed;

    fn conn(path: &str, state: &str, up: u64, down: u64) -> ConnectionInfo {
        ConnectionInfo {
            path: path.into(),
            state: state.into(),
            bytes_to_host: up,
            bytes_to_guest: down,
            sock_type: "stream".into(),
            ..ConnectionInfo::default()
        }
    }

    impl VsockControl for Fixed {
        fn info(&self) -> VsockInfo {
            let activity: BTreeMap<String, u64> = [
                ("incoming", 4),
                ("tx_packets", 100),
                ("rx_packets", 90),
                ("ended_bytes_to_host", 1000),
                ("ended_bytes_to_guest", 2000),
                ("ended_stream_conns", 5),
                ("ended_seqpacket_conns", 2),
                ("ended_messages_to_host", 30),
                ("ended_messages_to_guest", 40),
                ("busy_ns", 1_500_000_000),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            VsockInfo {
                cid: 3,
                g2h_fallback: true,
                counters: VsockCounters {
                    host: 7,
                    refused: 2,
                    activity,
                    errors: [("bad_len".to_string(), 6), ("timeouts".to_string(), 1)].into(),
                    handshakes: [(
                        "host".to_string(),
                        [
                            ("completed".to_string(), 8),
                            ("accept_paused".to_string(), 2),
                        ]
                        .into(),
                    )]
                    .into(),
                    uplink_attempts: 9,
                    rst_sent: [("refused".to_string(), 2)].into(),
                    rst_received: [("handshake".to_string(), 1)].into(),
                    ..VsockCounters::default()
                },
                ..VsockInfo::default()
            }
        }

        fn set_g2h_fallback(&self, _: bool) {}

        fn connections(&self) -> Vec<ConnectionInfo> {
            vec![
                conn("host", "established", 10, 20),
                conn("host", "established", 1, 2),
                conn("uplink", "connecting", 0, 0),
                ConnectionInfo {
                    sock_type: "seqpacket".into(),
                    messages_to_host: 3,
                    messages_to_guest: 4,
                    ..conn("sibling", "established", 0, 0)
                },
            ]
        }
    }

    #[test]
    fn a_scrape_has_every_family_with_the_values_of_the_device() {
        let (kind, body) = render(&Fixed, None);
        assert_eq!(kind, PROMETHEUS_TEXT);
        for line in [
            "# TYPE vsock_guest_connections counter",
            "vsock_guest_connections_total{route=\"host\"} 7",
            "vsock_guest_connections_total{route=\"sibling\"} 0",
            "vsock_guest_connections_total{route=\"refused\"} 2",
            "vsock_host_connections_total 4",
            "# TYPE vsock_connections gauge",
            "vsock_connections{path=\"host\",state=\"established\",type=\"stream\"} 2",
            "vsock_connections{path=\"host\",state=\"established\",type=\"seqpacket\"} 0",
            "vsock_connections{path=\"uplink\",state=\"connecting\",type=\"stream\"} 1",
            "vsock_connections{path=\"sibling\",state=\"killed\",type=\"stream\"} 0",
            "vsock_connections{path=\"sibling\",state=\"established\",type=\"seqpacket\"} 1",
            "vsock_ended_connections_total{type=\"stream\"} 5",
            "vsock_ended_connections_total{type=\"seqpacket\"} 2",
            "vsock_messages_total{direction=\"to_host\"} 33",
            "vsock_messages_total{direction=\"to_guest\"} 44",
            "vsock_bytes_total{direction=\"to_host\"} 1011",
            "vsock_bytes_total{direction=\"to_guest\"} 2022",
            "vsock_packets_total{queue=\"tx\"} 100",
            "vsock_rst_sent_total{reason=\"refused\"} 2",
            "vsock_rst_received_total{state=\"handshake\"} 1",
            "vsock_device_busy_seconds_total 1.5",
            "vsock_errors_total{kind=\"bad_len\"} 6",
            "vsock_errors_total{kind=\"timeouts\"} 1",
            "vsock_g2h_fallback 1",
            "vsock_guest_cid 3",
            "vsock_handshakes_total{socket=\"host\",result=\"completed\"} 8",
            "vsock_handshakes_total{socket=\"host\",result=\"timed_out\"} 0",
            "vsock_accept_paused_total{socket=\"host\"} 2",
            "vsock_accept_paused_total{socket=\"listen\"} 0",
            "vsock_uplink_attempts_total 9",
            "vsock_credit_stalls_total 0",
        ] {
            assert!(body.lines().any(|l| l == line), "no `{line}` in\n{body}");
        }
        assert!(!body.contains("# EOF"), "Prometheus text has no EOF marker");
        // Every sample line is `name{labels} value` with a number for the value.
        for l in body.lines().filter(|l| !l.starts_with('#')) {
            let v = l.rsplit(' ').next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "{l}");
        }
    }

    #[test]
    fn openmetrics_when_the_scraper_asks_for_it() {
        let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        let (kind, body) = render(&Fixed, Some(accept));
        assert_eq!(kind, OPENMETRICS_TEXT);
        assert!(body.ends_with("# EOF\n"), "{body}");
        let (_, plain) = render(&Fixed, Some("text/plain"));
        assert_eq!(format!("{plain}# EOF\n"), body);
    }
}
