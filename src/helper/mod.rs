//! The daemon ↔ sandboxed conntrack helper protocol (client and server).
