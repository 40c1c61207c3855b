//! Per-connection state machine and credit flow control.
