//! SOCK_SEQPACKET sockets of the simulated guest, as Linux's vsock core sends and receives
//! messages (`virtio_transport_seqpacket_enqueue` / `_dequeue`): a message goes out in packets
//! of at most 64 KiB within the device's credit, the last one flagged EOM (and EOR for
//! `MSG_EOR`); a message longer than the peer's buffer fails with EMSGSIZE before anything is
//! sent; a received message is taken whole, and a CREDIT_UPDATE follows each one.

use std::time::{Duration, Instant};

use super::{SimGuest, SockState};
use crate::wire::{op, seq, sock_type, MAX_PAYLOAD};

impl SimGuest {
    /// Connects a SOCK_SEQPACKET socket to (`cid`, `port`); returns the local port, or the final
    /// state on failure (an RST: `Reset`).
    pub fn connect_seq(&mut self, cid: u64, port: u32) -> Result<u32, SockState> {
        let local = self.next_port;
        self.next_port += 1;
        self.connect_typed(local, cid, port, sock_type::SEQPACKET)
    }

    /// Sends `msg` as one message on the SOCK_SEQPACKET socket `port` (`eor`: with `MSG_EOR`),
    /// waiting (bounded) for credit between packets. Fails like Linux with EMSGSIZE when the
    /// message is longer than the device's buffer or ours.
    pub fn send_msg(
        &mut self,
        port: u32,
        msg: &[u8],
        eor: bool,
        timeout: Duration,
    ) -> Result<(), String> {
        let s = self.socks.get(&port).ok_or("no such socket")?;
        if s.sock_type != sock_type::SEQPACKET {
            return Err(format!("socket {port} is not SOCK_SEQPACKET"));
        }
        let limit = s.peer_buf_alloc.min(s.buf_alloc) as usize;
        if msg.len() > limit {
            return Err(format!("EMSGSIZE: {} > {limit}", msg.len()));
        }
        let deadline = Instant::now() + timeout;
        let mut off = 0;
        loop {
            let s = self.socks.get(&port).ok_or("no such socket")?;
            if s.state != SockState::Established {
                return Err(format!("socket {port} is {:?}", s.state));
            }
            let credit = s.peer_credit() as usize;
            let left = msg.len() - off;
            if credit == 0 && left > 0 {
                if Instant::now() > deadline {
                    return Err(format!("no credit on {port} after {timeout:?}"));
                }
                self.pump(Duration::from_millis(20));
                continue;
            }
            let n = credit.min(MAX_PAYLOAD as usize).min(left);
            let last = n == left;
            let flags = if last {
                seq::EOM | if eor { seq::EOR } else { 0 }
            } else {
                0
            };
            self.send_rw_flags(port, &msg[off..off + n], flags);
            off += n;
            self.pump(Duration::ZERO);
            if last {
                return Ok(());
            }
        }
    }

    /// Takes the next whole message received on `port`, with its EOR flag, waiting up to
    /// `timeout`; `None` when none came (or the peer ended the connection first).
    pub fn recv_msg(&mut self, port: u32, timeout: Duration) -> Option<(Vec<u8>, bool)> {
        self.pump_until(timeout, |g| {
            g.socks
                .get(&port)
                .is_none_or(|s| !s.msg_ends.is_empty() || s.eof())
        });
        let s = self.socks.get_mut(&port)?;
        let (end, eor) = s.msg_ends.pop_front()?;
        let n = (end - s.rx_taken) as usize;
        let out: Vec<u8> = s.rx.drain(..n).collect();
        s.rx_taken += n as u64;
        s.consume(n);
        // Linux's virtio_transport_seqpacket_do_dequeue tells the peer its credit after every
        // message, whatever the free space.
        self.send_ctl(port, op::CREDIT_UPDATE, 0);
        Some((out, eor))
    }
}
