//! The `log` backend of `vsock-vmm`: one line per record on stderr, as text (`vsock-vmm: LEVEL
//! target: message`, for a person or journald, which adds the time) or as JSON (one object per
//! line: `ts` in RFC 3339 UTC, `level`, `target`, `message`, and the record's key-value fields
//! at the top level, e.g. a connection's `path`, `bytes_to_host` and `seconds`), chosen with
//! `--log-format`.

use std::io::Write;
use std::sync::OnceLock;
use std::time::SystemTime;

use log::kv::{self, VisitSource};
use serde_json::{Map, Value};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `vsock-vmm: LEVEL target: message`.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

struct StderrLogger;

static FORMAT: OnceLock<LogFormat> = OnceLock::new();
/// The program name text lines start with (`vsock-vmm` unless [`init_as`] named another).
static PROGRAM: OnceLock<&'static str> = OnceLock::new();

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let line = format_record(
                FORMAT.get().copied().unwrap_or_default(),
                record,
                SystemTime::now(),
            );
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger at `level` in `format` (once; later calls only change the level).
pub fn init(level: log::LevelFilter, format: LogFormat) {
    init_as("vsock-vmm", level, format);
}

/// As [`init`], for another program of the workspace (`vsock-routerd`): its text lines start
/// with `program`.
pub fn init_as(program: &'static str, level: log::LevelFilter, format: LogFormat) {
    let _ = PROGRAM.set(program);
    let _ = FORMAT.set(format);
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// One record as a line (without its newline).
pub fn format_record(format: LogFormat, record: &log::Record<'_>, at: SystemTime) -> String {
    match format {
        LogFormat::Text => format!(
            "{}: {} {}: {}",
            PROGRAM.get().copied().unwrap_or("vsock-vmm"),
            record.level(),
            record.target(),
            record.args()
        ),
        LogFormat::Json => {
            let mut obj = Map::new();
            obj.insert(
                "ts".into(),
                humantime::format_rfc3339_millis(at).to_string().into(),
            );
            obj.insert("level".into(), record.level().as_str().into());
            obj.insert("target".into(), record.target().into());
            obj.insert("message".into(), record.args().to_string().into());
            let mut fields = Fields(&mut obj);
            // A field that cannot be visited is left out; the message still says it all.
            let _ = record.key_values().visit(&mut fields);
            Value::Object(obj).to_string()
        }
    }
}

/// Collects key-value fields into the JSON object (numbers and booleans as such).
struct Fields<'a>(&'a mut Map<String, Value>);

impl<'kvs> VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(&mut self, key: kv::Key<'kvs>, value: kv::Value<'kvs>) -> Result<(), kv::Error> {
        let v = if let Some(b) = value.to_bool() {
            Value::Bool(b)
        } else if let Some(n) = value.to_u64() {
            Value::from(n)
        } else if let Some(n) = value.to_i64() {
            Value::from(n)
        } else if let Some(f) = value.to_f64() {
            Value::from(f)
        } else {
            Value::String(value.to_string())
        };
        self.0.entry(key.as_str().to_string()).or_insert(v);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn line(format: LogFormat) -> String {
        let kvs: [(&str, kv::Value); 4] = [
            ("path", kv::Value::from("host")),
            ("bytes_to_host", kv::Value::from(100_000u64)),
            ("to_host", kv::Value::from(false)),
            ("seconds", kv::Value::from(1.5f64)),
        ];
        let at = UNIX_EPOCH + Duration::from_millis(1_764_650_000_123);
        format_record(
            format,
            &log::Record::builder()
                .level(log::Level::Info)
                .target("vsock_router::csm::conn_log")
                .args(format_args!("vsock: connection \"3:5000\" ended"))
                .key_values(&kvs)
                .build(),
            at,
        )
    }

    #[test]
    fn text_is_the_message_and_json_has_the_fields() {
        assert_eq!(
            line(LogFormat::Text),
            "vsock-vmm: INFO vsock_router::csm::conn_log: vsock: connection \"3:5000\" ended"
        );
        let v: Value = serde_json::from_str(&line(LogFormat::Json)).unwrap();
        assert_eq!(v["ts"], "2025-12-02T04:33:20.123Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "vsock_router::csm::conn_log");
        assert_eq!(v["message"], "vsock: connection \"3:5000\" ended");
        assert_eq!(v["path"], "host");
        assert_eq!(v["bytes_to_host"], 100_000);
        assert_eq!(v["to_host"], false);
        assert_eq!(v["seconds"], 1.5);
    }
}
