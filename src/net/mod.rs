//! Listening sockets, shared by every server in the crate: [`accept`] keeps an accept loop from
//! spinning when the process runs out of file descriptors, [`idle`] closes connections on which
//! nothing moves, and [`http`] serves a hyper handler with the timeouts a public HTTP endpoint
//! needs.

pub mod accept;
pub mod http;
pub mod idle;
