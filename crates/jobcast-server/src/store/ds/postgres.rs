//! Durable Streams on PostgreSQL (not yet: waits for the store's write-path
//! rewrite; every call answers `store_unavailable`).

use sqlx::PgPool;

use super::{DsOutcome, DsPage, DsWrite};
use crate::store::StoreError;

fn not_yet() -> StoreError {
    StoreError::Unavailable("Durable Streams on PostgreSQL is not implemented yet".into())
}

/// A DS write.
pub(crate) async fn write(_pool: &PgPool, _w: DsWrite) -> Result<DsOutcome, StoreError> {
    Err(not_yet())
}

/// A DS read.
pub(crate) async fn read(
    _pool: &PgPool,
    _stream: &str,
    _after: Option<u64>,
    _max_bytes: usize,
) -> Result<Option<DsPage>, StoreError> {
    Err(not_yet())
}
