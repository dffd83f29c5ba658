//! Key material: what a key is ([`KeySpec`], [`PublicKey`]), how it may be used ([`Signer`]), how it
//! is sealed at rest ([`Kek`], [`seal`]) and where it lives ([`KeyStore`] and its backends).

pub mod crypto;
pub mod file_store;
pub mod kek;
pub mod public_key;
pub mod seal;
pub mod signer;
pub mod software_key;
pub mod spec;
mod spki;
pub mod store;

pub use file_store::{FileStore, KEYRING_FILE};
pub use kek::{Kek, KekError};
pub use public_key::{PublicKey, PublicParams, kid_of};
pub use signer::{SignError, Signer};
pub use software_key::{KeyError, SoftwareKey};
pub use spec::{KeySpec, SpecError};
pub use store::{KeyStore, LoadedKeys, StoreError};
