pub mod jail;
pub mod policy;
