//! Helpers shared by the integration tests. Each test binary includes this
//! with `mod common;` and uses what it needs.
#![allow(dead_code)]

pub mod bus;
pub mod compare;
pub mod ctcli;
pub mod entries;
pub mod host;
pub mod netns;
pub mod population;
pub mod qemu;
