//! TLS that the node terminates itself (client port, metrics, peer port): certificates loaded
//! from PEM files and swapped without a restart (see [`reload`]), and the stream type the
//! listeners hand to their servers (see [`stream`]).

pub mod reload;
pub mod stream;

pub use reload::{ReloadMetrics, ReloadingTls, TlsFiles};
pub use stream::Secured;

/// The rustls the node's TLS is built with (tonic's, through tokio-rustls).
pub use tokio_rustls::rustls;
/// A DER certificate, as a peer's chain holds them.
pub use tokio_rustls::rustls::pki_types::CertificateDer;
