//! The binary's own code: argument definitions, exit codes, the commands.

pub mod args;
pub mod commands;
pub mod exit;
