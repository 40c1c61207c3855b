//! A cursor over fuzz bytes that never fails: past the end every read yields zeros, so each
//! input, however short, maps to exactly one run.

/// Reads small integers and byte strings off the front of a fuzz input.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A cursor over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Bytes left.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Up to `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    /// One byte, 0 past the end.
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    fn le<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let src = self.bytes(N);
        b[..src.len()].copy_from_slice(src);
        b
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.le())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.le())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.le())
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u32) -> u32 {
        if n == 0 {
            0
        } else {
            u32::from(self.u8()) % n
        }
    }

    /// `true` with about one chance in `n`.
    pub fn one_in(&mut self, n: u8) -> bool {
        n != 0 && self.u8() % n == 0
    }

    /// A packet op: mostly one of 0–7 (the defined ones and INVALID), now and then any `u16`.
    pub fn op(&mut self) -> u16 {
        match self.u8() {
            x if x < 240 => u16::from(x % 8),
            _ => self.u16(),
        }
    }

    /// Packet flags: mostly a combination of SHUTDOWN's RCV and SEND, now and then any `u32`.
    pub fn flags(&mut self) -> u32 {
        if self.one_in(4) {
            self.u32()
        } else {
            u32::from(self.u8() % 4)
        }
    }
}

/// A deterministic xorshift generator for the pseudo-random inputs of the corpus test.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from a non-zero seed (0 is replaced).
    pub fn new(seed: u64) -> Self {
        XorShift(seed.max(1))
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// `n` pseudo-random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_the_end_are_zero() {
        let mut i = Input::new(&[1, 2, 3]);
        assert_eq!(i.u16(), 0x0201);
        assert_eq!(i.u32(), 3);
        assert_eq!(i.u64(), 0);
        assert!(i.is_empty());
        assert_eq!(i.below(7), 0);
    }

    #[test]
    fn ops_and_flags_are_mostly_small_and_sometimes_anything() {
        // 13 % 8 = 5; 250 takes the next two bytes whole.
        let mut i = Input::new(&[13, 250, 0x34, 0x12]);
        assert_eq!((i.op(), i.op()), (5, 0x1234));
        // 1 % 4 != 0: 7 % 4 = 3; 8 % 4 == 0: the next four bytes whole.
        let mut i = Input::new(&[1, 7, 8, 1, 0, 0, 0x80]);
        assert_eq!((i.flags(), i.flags()), (3, 0x8000_0001));
    }
}
