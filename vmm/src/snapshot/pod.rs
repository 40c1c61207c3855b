//! The KVM state structs in `state.json`: each as the hex string of its bytes.
//!
//! They are the kernel's own ABI structs (bindgen's `repr(C)` copies in kvm-bindings), restored
//! byte for byte on the same host. kvm-bindings' `serde` feature would bring a second `syn`
//! into the workspace; this encoding needs nothing. The length is checked on decode.

use serde::{Deserialize, Deserializer, Serializer};

/// A kvm-bindings struct that is plain C data.
///
/// # Safety
///
/// Implement only for `repr(C)` structs made of integers, arrays and unions of them (no
/// references, no `bool` or enum fields, no padding that matters): every byte pattern of
/// `size_of::<Self>()` bytes is a valid value.
pub unsafe trait Pod: Copy + Default {}

macro_rules! pod {
    ($($t:ty),*) => {$(
        // SAFETY: a bindgen copy of a kernel ABI struct of integers, integer arrays and unions
        // of them: every byte pattern is a valid value.
        unsafe impl Pod for $t {}
    )*};
}

pod!(
    kvm_bindings::kvm_regs,
    kvm_bindings::kvm_sregs,
    kvm_bindings::kvm_xcrs,
    kvm_bindings::kvm_lapic_state,
    kvm_bindings::kvm_vcpu_events,
    kvm_bindings::kvm_mp_state,
    kvm_bindings::kvm_debugregs,
    kvm_bindings::kvm_irqchip,
    kvm_bindings::kvm_pit_state2,
    kvm_bindings::kvm_clock_data
);

/// The bytes of `value`.
pub fn bytes<T: Pod>(value: &T) -> Vec<u8> {
    // SAFETY: `value` is a live `T` of `size_of::<T>()` bytes. `Pod` types have no implicit
    // padding (kvm-bindings derives zerocopy's `IntoBytes`, which proves that, for every one of
    // them under its `serde` feature; their padding is explicit `pad` fields), so every byte
    // is initialized.
    let slice = unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    };
    slice.to_vec()
}

/// The value whose bytes are `raw`; `None` if the length is not `size_of::<T>()`.
pub fn from_bytes<T: Pod>(raw: &[u8]) -> Option<T> {
    if raw.len() != std::mem::size_of::<T>() {
        return None;
    }
    let mut value = T::default();
    // SAFETY: `raw` has exactly `size_of::<T>()` bytes and does not overlap the local `value`;
    // every byte pattern is a valid `T` (`Pod`).
    unsafe {
        std::ptr::copy_nonoverlapping(raw.as_ptr(), (&mut value as *mut T).cast::<u8>(), raw.len())
    };
    Some(value)
}

fn hex(raw: &[u8]) -> String {
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `#[serde(with = "pod")]`: writes the hex string of the bytes.
pub fn serialize<T: Pod, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex(&bytes(value)))
}

/// `#[serde(with = "pod")]`: reads the hex string of exactly `size_of::<T>()` bytes.
pub fn deserialize<'de, T: Pod, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    let text = String::deserialize(d)?;
    let raw = unhex(&text).ok_or_else(|| serde::de::Error::custom("not a hex string"))?;
    from_bytes(&raw).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "{} bytes where {} ({}) were expected",
            raw.len(),
            std::mem::size_of::<T>(),
            std::any::type_name::<T>()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_length_check() {
        let regs = kvm_bindings::kvm_regs {
            rax: 0x1122_3344_5566_7788,
            rip: 0x10_0000,
            rflags: 2,
            ..Default::default()
        };
        let back: kvm_bindings::kvm_regs = from_bytes(&bytes(&regs)).unwrap();
        assert_eq!((back.rax, back.rip, back.rflags), (regs.rax, regs.rip, 2));
        assert!(from_bytes::<kvm_bindings::kvm_regs>(&[0; 3]).is_none());
        assert_eq!(unhex(&hex(&[0, 0xab, 0xff])), Some(vec![0, 0xab, 0xff]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("é0"), None);
    }
}
