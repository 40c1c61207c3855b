//! The guest side of one vsock socket, with Linux's credit accounting.

use std::collections::VecDeque;

use super::Sink;
use crate::wire::{shutdown, sock_type, Header, MAX_PAYLOAD};

/// State of a guest socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockState {
    /// REQUEST sent, waiting for RESPONSE.
    Connecting,
    /// Connected.
    Established,
    /// We sent SHUTDOWN(RCV|SEND) and wait for the RST.
    Closing,
    /// Reset by the peer (or by us).
    Reset,
}

/// A guest socket.
#[derive(Debug)]
pub struct SimSock {
    /// Local (guest) port.
    pub local_port: u32,
    /// Peer CID.
    pub peer_cid: u64,
    /// Peer port.
    pub peer_port: u32,
    /// State.
    pub state: SockState,
    /// Our receive buffer size.
    pub buf_alloc: u32,
    /// Bytes our application consumed.
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last told to the device.
    pub last_fwd_sent: u32,
    /// Received, not yet consumed.
    pub rx: VecDeque<u8>,
    /// Total bytes received.
    pub rx_total: u64,
    /// The device's receive buffer size.
    pub peer_buf_alloc: u32,
    /// The device's consumed count.
    pub peer_fwd_cnt: u32,
    /// Bytes we sent.
    pub tx_cnt: u32,
    /// Shutdown flags the device sent.
    pub peer_shutdown: u32,
    /// Shutdown flags we sent.
    pub local_shutdown: u32,
    /// Where received bytes go instead of [`SimSock::rx`], consumed at once (see
    /// [`SimGuest::set_sink`](super::SimGuest::set_sink)).
    pub sink: Option<Sink>,
    /// The socket type (`sock_type::STREAM` or `SEQPACKET`).
    pub sock_type: u16,
    /// SOCK_SEQPACKET: where each received message ends (in bytes received since the start,
    /// as [`SimSock::rx_total`] counts them) and whether it ended a record (EOR).
    pub msg_ends: VecDeque<(u64, bool)>,
    /// Bytes the application took from [`SimSock::rx`].
    pub rx_taken: u64,
}

impl SimSock {
    /// A new socket in `Connecting` state.
    pub fn new(local_port: u32, peer_cid: u64, peer_port: u32, buf_alloc: u32) -> Self {
        SimSock {
            local_port,
            peer_cid,
            peer_port,
            state: SockState::Connecting,
            buf_alloc,
            fwd_cnt: 0,
            last_fwd_sent: 0,
            rx: VecDeque::new(),
            rx_total: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            peer_shutdown: 0,
            local_shutdown: 0,
            sink: None,
            sock_type: sock_type::STREAM,
            msg_ends: VecDeque::new(),
            rx_taken: 0,
        }
    }

    /// Takes the device's credit from any packet.
    pub fn update_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    /// Bytes we may still send.
    pub fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Counts `n` bytes as consumed by the application; returns whether a CREDIT_UPDATE is due,
    /// as Linux sends one when the device's view of our free space falls below 64 KiB.
    pub fn consume(&mut self, n: usize) -> bool {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        let unsent = self
            .fwd_cnt
            .wrapping_sub(self.last_fwd_sent)
            .min(self.buf_alloc);
        n > 0 && self.buf_alloc - unsent < MAX_PAYLOAD
    }

    /// Whether no more bytes will arrive (peer shut its sending side, or reset).
    pub fn eof(&self) -> bool {
        self.rx.is_empty()
            && (self.peer_shutdown & shutdown::SEND != 0 || self.state == SockState::Reset)
    }
}
