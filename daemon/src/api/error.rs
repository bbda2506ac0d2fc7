//! The one error body of the API: every non-2xx answer, from a handler, from the request
//! extractors, from authentication or from the router itself, is `{"error": "..."}` with one
//! line of text (docs/api.md, "errors").

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `{"error": "one line saying what is wrong"}`, with a non-2xx status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What is wrong, in one line.
    pub error: String,
}
