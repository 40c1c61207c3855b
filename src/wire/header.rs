//! The 44-byte virtio-vsock packet header and its protocol constants.
//!
//! The header is copied out of guest memory exactly once into a [`Header`] value and validated
//! there, so a guest that rewrites its buffer while the device works cannot change a decision
//! after it was taken.

/// Size of the packed little-endian header on the wire.
pub const HEADER_LEN: usize = 44;

/// Largest payload the device accepts or produces in one packet (Linux uses the same bound).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// The well-known CID of the host (the VMM itself).
pub const HOST_CID: u64 = 2;

/// Packet operations (`op` field).
pub mod op {
    /// Invalid operation.
    pub const INVALID: u16 = 0;
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset.
    pub const RST: u16 = 3;
    /// Half or full shutdown; see [`super::shutdown`].
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's credit changed.
    pub const CREDIT_UPDATE: u16 = 6;
    /// The sender asks for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// Socket types (`type` field).
pub mod sock_type {
    /// Byte stream.
    pub const STREAM: u16 = 1;
    /// Sequential packets: a connection that keeps message boundaries
    /// (`VIRTIO_VSOCK_F_SEQPACKET`).
    pub const SEQPACKET: u16 = 2;
}

/// The socket type of a connection, as the device serves it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SockType {
    /// `SOCK_STREAM`: bytes, no boundaries.
    #[default]
    Stream,
    /// `SOCK_SEQPACKET`: messages, each delivered whole or not at all.
    Seqpacket,
}

impl SockType {
    /// The type of a header's `type` field, `None` for a type that does not exist.
    pub fn from_wire(t: u16) -> Option<SockType> {
        match t {
            sock_type::STREAM => Some(SockType::Stream),
            sock_type::SEQPACKET => Some(SockType::Seqpacket),
            _ => None,
        }
    }

    /// The value of the header's `type` field.
    pub fn wire(self) -> u16 {
        match self {
            SockType::Stream => sock_type::STREAM,
            SockType::Seqpacket => sock_type::SEQPACKET,
        }
    }

    /// The lowercase name used by the API, metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            SockType::Stream => "stream",
            SockType::Seqpacket => "seqpacket",
        }
    }

    /// The `socket(2)` type of the host-side socket.
    pub fn libc(self) -> i32 {
        match self {
            SockType::Stream => libc::SOCK_STREAM,
            SockType::Seqpacket => libc::SOCK_SEQPACKET,
        }
    }
}

/// Flags of a SHUTDOWN packet; cumulative.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
    /// Both directions.
    pub const BOTH: u32 = RCV | SEND;
}

/// Flags of an RW packet of a SOCK_SEQPACKET connection (the kernel reads them for that type
/// only; on a STREAM connection they mean nothing).
pub mod seq {
    /// `VIRTIO_VSOCK_SEQ_EOM`: the last packet of a message.
    pub const EOM: u32 = 1;
    /// `VIRTIO_VSOCK_SEQ_EOR`: the message ends a record (`MSG_EOR`).
    pub const EOR: u32 = 2;
}

/// A decoded packet header. Field names follow the virtio specification.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation-specific flags.
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender's application consumed so far (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes a header from its wire form.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"));
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header into its wire form.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The reply to this packet that resets it: addresses swapped, no credit, op RST, and the
    /// packet's own socket type, whatever it is (the kernel's `virtio_transport_reset_no_sock`
    /// copies it too, so a SEQPACKET request is answered with a SEQPACKET RST).
    pub fn rst_reply(&self) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            type_: self.type_,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_roundtrip_is_little_endian() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x0102_0304,
            dst_port: 1234,
            len: 5,
            type_: sock_type::STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0xdead_beef,
        };
        let b = h.encode();
        assert_eq!(b[0], 3);
        assert_eq!(&b[16..20], &[4, 3, 2, 1]);
        assert_eq!(&b[40..44], &[0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(Header::decode(&b), h);
    }

    #[test]
    fn rst_reply_swaps_addresses_and_clears_credit() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 10,
            dst_port: 20,
            len: 7,
            type_: sock_type::SEQPACKET,
            op: op::RW,
            buf_alloc: 9,
            fwd_cnt: 9,
            flags: 1,
        };
        let r = h.rst_reply();
        assert_eq!(
            (r.src_cid, r.dst_cid, r.src_port, r.dst_port),
            (2, 3, 20, 10)
        );
        assert_eq!(
            (r.op, r.len, r.buf_alloc, r.fwd_cnt, r.flags),
            (op::RST, 0, 0, 0, 0)
        );
        assert_eq!(r.type_, sock_type::SEQPACKET, "the type is mirrored");
        let odd = Header { type_: 7, ..h };
        assert_eq!(odd.rst_reply().type_, 7);
    }
}
