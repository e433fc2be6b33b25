//! The unprivileged tier: format, wire, text, CLI engine, helper protocol
//! (in-process, fake access). Runs as any user; the few tests that need a
//! namespace say so and skip outside CI when not root (see `testkit::tier`).

// `common::…` in every module: the kit, once for the whole binary.
extern crate testkit as common;

mod cli_engine;
mod confine_props;
mod format_budget;
mod format_fuzz;
mod format_malformed;
mod format_patch;
mod format_progressive;
mod format_roundtrip;
mod format_saved_at;
mod format_segments;
mod format_text;
mod helper_protocol;
mod smoke;
