//! The kernel tier: ctnetlink, the cache, the CLI engine and the helper
//! against the real kernel conntrack in network namespaces the tests create.
//! Needs root; as a normal user outside CI every test says it skipped.

// `common::…` in every module: the kit, once for the whole binary.
extern crate testkit as common;

mod cache_base;
mod cache_eperm;
mod cache_events;
mod cache_measure;
mod cache_traffic;
mod cache_warm;
mod cli_engine_netns;
mod confine_helper;
mod ctnetlink_delete;
mod ctnetlink_eperm;
mod ctnetlink_protocols;
mod ctnetlink_roundtrip;
mod helper_kernel;
mod load_aged;
mod load_budget;
