//! The one `key=value,key=value` option parser of the library and of `vsock-vmm` (Cloud
//! Hypervisor style).
//!
//! Every option group (`--vsock cid=3,socket=...`, `--cpus boot=2`, `--memory size=256M`,
//! `--serial file=/tmp/s`) goes through [`OptionParser`], so every error names the option, the
//! key and the value that was wrong. The grammar is strict: items are separated by single
//! commas (no empty item), each key at most once, every key with a non-empty value; a bare word
//! is accepted only where the option declares it a flag (`--serial tty`).

use std::collections::BTreeMap;

/// Why an option group could not be parsed. Every variant names the option and the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// A key the option does not know.
    #[error("--{option}: unknown key `{key}` (known keys: {known})")]
    UnknownKey {
        /// The option, without dashes.
        option: &'static str,
        /// The key given.
        key: String,
        /// The keys the option accepts, comma separated.
        known: String,
    },
    /// The same key was given twice.
    #[error("--{option}: key `{key}` given twice")]
    DuplicateKey {
        /// The option, without dashes.
        option: &'static str,
        /// The key given twice.
        key: String,
    },
    /// A key without `=value`, or with an empty value.
    #[error("--{option}: key `{key}` needs a value (`{key}=...`)")]
    MissingValue {
        /// The option, without dashes.
        option: &'static str,
        /// The key.
        key: String,
    },
    /// An empty group, an empty item, or an item without a key.
    #[error("--{option}: malformed item `{item}` (expected key=value)")]
    Malformed {
        /// The option, without dashes.
        option: &'static str,
        /// The offending item.
        item: String,
    },
    /// A key whose value does not parse or is out of range.
    #[error("--{option}: invalid {key}=`{value}`: {why}")]
    Invalid {
        /// The option, without dashes.
        option: &'static str,
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What was wrong with it.
        why: String,
    },
    /// A required key is missing.
    #[error("--{option}: missing required key `{key}`")]
    MissingKey {
        /// The option, without dashes.
        option: &'static str,
        /// The key that must be given.
        key: String,
    },
}

/// Parses one `key=value,key=value` option group against a fixed set of keys.
#[derive(Debug)]
pub struct OptionParser {
    option: &'static str,
    keys: &'static [&'static str],
    flags: &'static [&'static str],
    values: BTreeMap<String, String>,
}

impl OptionParser {
    /// A parser for `--option`, accepting `keys` as `key=value` and `flags` as bare words.
    pub fn new(
        option: &'static str,
        keys: &'static [&'static str],
        flags: &'static [&'static str],
    ) -> Self {
        OptionParser {
            option,
            keys,
            flags,
            values: BTreeMap::new(),
        }
    }

    /// Parses `input`, rejecting unknown and duplicate keys, empty items and empty values.
    pub fn parse(mut self, input: &str) -> Result<Self, OptionError> {
        if input.trim().is_empty() {
            return Err(self.malformed(input));
        }
        for item in input.split(',') {
            let (key, value) = match item.split_once('=') {
                Some(("", _)) => return Err(self.malformed(item)),
                Some((key, _)) if !self.keys.contains(&key) => return Err(self.unknown(key)),
                Some((key, "")) => return Err(self.missing_value(key)),
                Some((key, value)) => (key, value),
                None if self.flags.contains(&item) => (item, ""),
                None if self.keys.contains(&item) => return Err(self.missing_value(item)),
                None if item.is_empty() || self.flags.is_empty() => {
                    return Err(self.malformed(item))
                }
                None => return Err(self.unknown(item)),
            };
            if self
                .values
                .insert(key.to_string(), value.to_string())
                .is_some()
            {
                return Err(OptionError::DuplicateKey {
                    option: self.option,
                    key: key.to_string(),
                });
            }
        }
        Ok(self)
    }

    fn unknown(&self, key: &str) -> OptionError {
        let mut all: Vec<&str> = self.keys.to_vec();
        all.extend(self.flags.iter());
        OptionError::UnknownKey {
            option: self.option,
            key: key.to_string(),
            known: all.join(", "),
        }
    }

    fn malformed(&self, item: &str) -> OptionError {
        OptionError::Malformed {
            option: self.option,
            item: item.to_string(),
        }
    }

    fn missing_value(&self, key: &str) -> OptionError {
        OptionError::MissingValue {
            option: self.option,
            key: key.to_string(),
        }
    }

    /// Whether `key` was given.
    pub fn is_set(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    /// The raw value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// The value of `key` converted by `convert`; a conversion error names key and value.
    pub fn convert<T>(
        &self,
        key: &str,
        convert: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, OptionError> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => convert(value)
                .map(Some)
                .map_err(|why| self.invalid(key, value, why)),
        }
    }

    /// Like [`OptionParser::convert`] for a key that must be present.
    pub fn required<T>(
        &self,
        key: &str,
        convert: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, OptionError> {
        self.convert(key, convert)?
            .ok_or_else(|| OptionError::MissingKey {
                option: self.option,
                key: key.to_string(),
            })
    }

    /// An [`OptionError::Invalid`] for `key` = `value`.
    pub fn invalid(&self, key: &str, value: &str, why: impl Into<String>) -> OptionError {
        OptionError::Invalid {
            option: self.option,
            key: key.to_string(),
            value: value.to_string(),
            why: why.into(),
        }
    }
}

/// A plain decimal number: digits only (no sign, no spaces).
pub fn decimal<T: std::str::FromStr>(v: &str) -> Result<T, String> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a decimal number".to_string());
    }
    v.parse().map_err(|_| "number too large".to_string())
}

/// Parses a byte size: a decimal number with an optional `K`, `M` or `G` suffix (powers of 1024).
pub fn parse_size(value: &str) -> Result<u64, String> {
    let (digits, shift) = match value.as_bytes().last() {
        Some(b'K' | b'k') => (&value[..value.len() - 1], 10),
        Some(b'M' | b'm') => (&value[..value.len() - 1], 20),
        Some(b'G' | b'g') => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    let number: u64 = decimal(digits)
        .map_err(|_| "expected a number with an optional K, M or G suffix".to_string())?;
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| "size overflows 64 bits".to_string())
}

/// Parses a decimal unsigned integer.
pub fn parse_u32(value: &str) -> Result<u32, String> {
    decimal(value).map_err(|_| "expected a decimal integer".to_string())
}

/// Parses a boolean switch: 0/1, on/off, true/false.
pub fn parse_switch(v: &str) -> Result<bool, String> {
    match v {
        "1" | "on" | "true" => Ok(true),
        "0" | "off" | "false" => Ok(false),
        _ => Err("expected 0, 1, on, off, true or false".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpus() -> OptionParser {
        OptionParser::new("cpus", &["boot"], &[])
    }

    #[test]
    fn parses_known_keys() {
        let p = cpus().parse("boot=4").unwrap();
        assert_eq!(p.get("boot"), Some("4"));
        assert_eq!(p.required("boot", parse_u32).unwrap(), 4);
    }

    #[test]
    fn unknown_key_names_key_and_known_keys() {
        let err = cpus().parse("boot=1,max=8").unwrap_err();
        assert_eq!(
            err.to_string(),
            "--cpus: unknown key `max` (known keys: boot)"
        );
    }

    #[test]
    fn duplicate_key_is_rejected() {
        let err = cpus().parse("boot=1,boot=2").unwrap_err();
        assert_eq!(err.to_string(), "--cpus: key `boot` given twice");
    }

    #[test]
    fn malformed_items_are_rejected() {
        for input in ["", "=3", "boot=1,", "boot=1,,boot=2"] {
            let err = cpus().parse(input).unwrap_err();
            assert!(
                matches!(err, OptionError::Malformed { .. }),
                "{input:?} gave {err:?}"
            );
            assert!(err.to_string().starts_with("--cpus: malformed item"));
        }
    }

    #[test]
    fn invalid_value_names_key_and_value() {
        let p = cpus().parse("boot=two").unwrap();
        let err = p.required("boot", parse_u32).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--cpus: invalid boot=`two`: expected a decimal integer"
        );
    }

    #[test]
    fn a_key_needs_a_value() {
        for input in ["boot", "boot="] {
            let err = cpus().parse(input).unwrap_err();
            assert_eq!(
                err.to_string(),
                "--cpus: key `boot` needs a value (`boot=...`)",
                "{input:?}"
            );
        }
    }

    #[test]
    fn missing_required_key() {
        let p = OptionParser::new("memory", &["size", "x"], &[])
            .parse("x=1")
            .unwrap();
        let err = p.required("size", parse_size).unwrap_err();
        assert_eq!(err.to_string(), "--memory: missing required key `size`");
    }

    #[test]
    fn flags_are_bare_words() {
        let p = OptionParser::new("serial", &["file"], &["tty", "off"])
            .parse("tty")
            .unwrap();
        assert!(p.is_set("tty"));
        let err = OptionParser::new("serial", &["file"], &["tty", "off"])
            .parse("file")
            .unwrap_err();
        assert!(matches!(err, OptionError::MissingValue { .. }));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999999G").is_err());
        assert!(parse_size("+5").is_err(), "plain digits only");
    }
}
