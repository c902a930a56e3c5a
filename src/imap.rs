//! IMAP pieces shared by the phases: the pre-login command reader, SASL, responses, secrets.

pub mod command;
pub mod response;
pub mod sasl;
pub mod scan;
pub mod secret;
