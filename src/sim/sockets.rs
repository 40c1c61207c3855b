//! The socket API of the simulated Linux guest: what an application on it does (listen, accept,
//! connect, send, receive, shut down, close, reset) and how its kernel answers the device's
//! packets (`SimGuest::on_packet`), with the credit accounting of a Linux socket. The driver
//! side (queues, RX buffers, TX layouts, pumping) is in the [parent module](super).

use std::time::{Duration, Instant};

use super::{SimGuest, SimSock, SockState};
use crate::wire::{op, seq, shutdown, sock_type, Header, MAX_PAYLOAD};

impl SimGuest {
    fn header(&self, s: &SimSock, op: u16, len: u32, flags: u32) -> Header {
        Header {
            src_cid: self.cid,
            dst_cid: s.peer_cid,
            src_port: s.local_port,
            dst_port: s.peer_port,
            len,
            type_: s.sock_type,
            op,
            flags,
            buf_alloc: s.buf_alloc,
            fwd_cnt: s.fwd_cnt,
        }
    }

    pub(super) fn send_ctl(&mut self, port: u32, op: u16, flags: u32) {
        let Some(s) = self.socks.get(&port) else {
            return;
        };
        let h = self.header(s, op, 0, flags);
        if let Some(s) = self.socks.get_mut(&port) {
            s.last_fwd_sent = s.fwd_cnt;
        }
        self.send_packet(&h, &[]);
    }

    /// Handles one packet the device put into an RX buffer, as Linux's vsock core does.
    pub(super) fn on_packet(&mut self, h: &Header, payload: &[u8]) {
        if self.received.len() < 100_000 {
            self.received.push(*h);
        }
        if h.dst_cid != self.cid {
            self.violations.push(format!(
                "packet for CID {} reached guest {}",
                h.dst_cid, self.cid
            ));
            return;
        }
        let port = h.dst_port;
        if h.op == op::REQUEST
            && self.listening.contains(&port)
            && self
                .socks
                .get(&port)
                .is_some_and(|s| s.peer_shutdown == shutdown::BOTH)
        {
            // The kernel dropped the peer-closed socket from its tables: the port is free.
            let old = self.socks.remove(&port).expect("checked");
            self.detached.push(old);
        }
        let matches = self
            .socks
            .get(&port)
            .is_some_and(|s| s.peer_cid == h.src_cid && s.peer_port == h.src_port);
        if !matches {
            if h.op == op::REQUEST
                && self.listening.contains(&port)
                && !self.socks.contains_key(&port)
            {
                let mut s = SimSock::new(port, h.src_cid, h.src_port, self.buf_alloc);
                s.sock_type = h.type_;
                s.state = SockState::Established;
                s.update_credit(h);
                self.socks.insert(port, s);
                self.accepted.push_back(port);
                self.send_ctl(port, op::RESPONSE, 0);
            } else if h.op != op::RST && self.answer_unknown {
                // Linux answers packets for unknown sockets with RST.
                self.send_packet(&h.rst_reply(), &[]);
            }
            return;
        }
        let mut reply = None;
        {
            let s = self.socks.get_mut(&port).expect("checked");
            s.update_credit(h);
            if h.type_ != s.sock_type {
                self.violations.push(format!(
                    "packet of type {} on a socket of type {} ({port})",
                    h.type_, s.sock_type
                ));
            }
            match (s.state, h.op) {
                (_, op::RST) => s.state = SockState::Reset,
                (SockState::Connecting, op::RESPONSE) => s.state = SockState::Established,
                (SockState::Connecting, _) => {
                    // Linux in SYN_SENT answers anything else with RST and fails connect().
                    self.violations
                        .push(format!("op {} before RESPONSE on port {port}", h.op));
                    s.state = SockState::Reset;
                    reply = Some(op::RST);
                }
                (SockState::Established | SockState::Closing, op::RW) => {
                    if s.peer_shutdown & shutdown::SEND != 0 {
                        self.violations
                            .push(format!("RW after SHUTDOWN(SEND) on {port}"));
                    }
                    let buffered = s.rx.len() + payload.len();
                    if buffered > s.buf_alloc as usize {
                        self.violations.push(format!(
                            "device overran guest credit on {port}: {buffered} > {}",
                            s.buf_alloc
                        ));
                    }
                    s.rx_total += payload.len() as u64;
                    let eom = h.flags & seq::EOM != 0;
                    if s.sock_type == sock_type::SEQPACKET && eom {
                        s.msg_ends.push_back((s.rx_total, h.flags & seq::EOR != 0));
                    } else if h.flags != 0 {
                        self.violations.push(format!(
                            "RW flags {:#x} without EOM or on a stream ({port})",
                            h.flags
                        ));
                    }
                    match s.sink.as_mut() {
                        Some(sink) => {
                            sink.take(payload);
                            if s.consume(payload.len()) {
                                reply = Some(op::CREDIT_UPDATE);
                            }
                        }
                        None => s.rx.extend(payload),
                    }
                }
                (_, op::SHUTDOWN) => {
                    s.peer_shutdown |= h.flags & shutdown::BOTH;
                    if s.peer_shutdown == shutdown::BOTH
                        && (s.rx.is_empty() || self.reset_with_unread)
                    {
                        s.state = SockState::Reset;
                        reply = Some(op::RST);
                    }
                }
                (_, op::CREDIT_REQUEST) => reply = Some(op::CREDIT_UPDATE),
                (_, op::CREDIT_UPDATE) => {}
                (st, o) => self
                    .violations
                    .push(format!("unexpected op {o} in state {st:?} on {port}")),
            }
        }
        if let Some(o) = reply {
            self.send_ctl(port, o, 0);
        }
    }

    /// Listens on `port`: host-initiated REQUESTs to it are accepted.
    pub fn listen(&mut self, port: u32) {
        self.listening.push(port);
    }

    /// Waits for an accepted connection; returns its local port.
    pub fn accept(&mut self, timeout: Duration) -> Option<u32> {
        self.pump_until(timeout, |g| !g.accepted.is_empty());
        self.accepted.pop_front()
    }

    /// Connects to (`cid`, `port`); returns the local port, or the final state on failure.
    pub fn connect(&mut self, cid: u64, port: u32) -> Result<u32, SockState> {
        let local = self.next_port;
        self.next_port += 1;
        self.connect_from(local, cid, port)
    }

    /// Connects from a chosen local port.
    pub fn connect_from(&mut self, local: u32, cid: u64, port: u32) -> Result<u32, SockState> {
        self.connect_typed(local, cid, port, sock_type::STREAM)
    }

    /// Connects a socket of type `ty` from a chosen local port.
    pub(super) fn connect_typed(
        &mut self,
        local: u32,
        cid: u64,
        port: u32,
        ty: u16,
    ) -> Result<u32, SockState> {
        let mut s = SimSock::new(local, cid, port, self.buf_alloc);
        s.sock_type = ty;
        self.socks.insert(local, s);
        self.send_ctl(local, op::REQUEST, 0);
        self.pump_until(Duration::from_secs(5), |g| {
            g.socks[&local].state != SockState::Connecting
        });
        match self.socks[&local].state {
            SockState::Established => Ok(local),
            st => {
                self.socks.remove(&local);
                Err(st)
            }
        }
    }

    /// Sends all of `data` on `port`, never beyond the device's credit.
    pub fn send(&mut self, port: u32, data: &[u8], timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut off = 0;
        while off < data.len() {
            let s = self.socks.get(&port).ok_or("no such socket")?;
            if s.state != SockState::Established {
                return Err(format!("socket {port} is {:?}", s.state));
            }
            let credit = s.peer_credit() as usize;
            if credit == 0 {
                if Instant::now() > deadline {
                    return Err(format!("no credit on {port} after {timeout:?}"));
                }
                self.pump(Duration::from_millis(20));
                continue;
            }
            let n = credit.min(MAX_PAYLOAD as usize).min(data.len() - off);
            self.send_rw(port, &data[off..off + n]);
            off += n;
            self.pump(Duration::ZERO);
        }
        Ok(())
    }

    /// Places one RW packet per `(port, chunk)` on the TX queue, in order, without letting
    /// the device run in between (as Linux queues packets while the device is busy), then
    /// waits up to `timeout` once for the device to take them. The chunks go regardless of
    /// the credit: a burst past it is the guest's overrun.
    pub fn send_burst(&mut self, packets: &[(u32, &[u8])], timeout: Duration) {
        for &(port, chunk) in packets {
            self.send_rw(port, chunk);
        }
        self.pump(timeout);
    }

    /// Sends `data` (at most 64 KiB, within the credit) as one RW packet on the socket `port`.
    pub(super) fn send_rw(&mut self, port: u32, data: &[u8]) {
        self.send_rw_flags(port, data, 0);
    }

    /// [`SimGuest::send_rw`] with RW `flags` (SOCK_SEQPACKET: EOM, EOR).
    pub(super) fn send_rw_flags(&mut self, port: u32, data: &[u8], flags: u32) {
        let Some(s) = self.socks.get(&port) else {
            return;
        };
        let h = self.header(s, op::RW, data.len() as u32, flags);
        let s = self.socks.get_mut(&port).expect("checked");
        s.tx_cnt = s.tx_cnt.wrapping_add(data.len() as u32);
        s.last_fwd_sent = s.fwd_cnt;
        self.send_packet(&h, data);
    }

    /// Takes up to `max` received bytes from `port`, and sends a credit update the way Linux
    /// does when the device's view of our free space gets low.
    pub fn recv(&mut self, port: u32, max: usize) -> Vec<u8> {
        let Some(s) = self.socks.get_mut(&port) else {
            return Vec::new();
        };
        let n = max.min(s.rx.len());
        let out: Vec<u8> = s.rx.drain(..n).collect();
        s.rx_taken += n as u64;
        if s.consume(n) {
            self.send_ctl(port, op::CREDIT_UPDATE, 0);
        }
        out
    }

    /// Receives until `n` bytes arrived, end of stream, or `timeout`.
    pub fn recv_exact(&mut self, port: u32, n: usize, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n && Instant::now() < deadline {
            let got = self.recv(port, n - out.len());
            if got.is_empty() {
                let eof = self.socks.get(&port).is_none_or(|s| s.eof());
                if eof {
                    break;
                }
                self.pump(Duration::from_millis(20));
            }
            out.extend(got);
        }
        out
    }

    /// Sends SHUTDOWN with `flags` on `port`.
    pub fn shutdown(&mut self, port: u32, flags: u32) {
        if let Some(s) = self.socks.get_mut(&port) {
            s.local_shutdown |= flags;
            s.state = if s.state == SockState::Established && flags == shutdown::BOTH {
                SockState::Closing
            } else {
                s.state
            };
        }
        self.send_ctl(port, op::SHUTDOWN, flags);
    }

    /// Closes `port` like Linux `close()`: SHUTDOWN(RCV|SEND), then waits (bounded) for the
    /// device's RST. Returns whether the RST came.
    pub fn close(&mut self, port: u32, timeout: Duration) -> bool {
        self.shutdown(port, shutdown::BOTH);
        let ok = self.pump_until(timeout, |g| {
            g.socks
                .get(&port)
                .is_none_or(|s| s.state == SockState::Reset)
        });
        self.socks.remove(&port);
        ok
    }

    /// Resets `port` as Linux does when a close times out (or the application aborts): sends
    /// RST and forgets the socket, freeing the port.
    pub fn reset(&mut self, port: u32) {
        if let Some(s) = self.socks.get(&port) {
            let h = self.header(s, op::RST, 0, 0);
            self.send_packet(&h, &[]);
            self.socks.remove(&port);
        }
    }
}
