//! Image routes: pull (202, then events), import (a streamed archive), list,
//! get, delete, and the events (JSON or SSE). Tenant-scoped: `read` sees,
//! `write` changes.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use hyperfleet_api::{
    ErrorCode, Image, ImageEventList, ImageList, ImageStatus, PullImageRequest, Scope,
};
use serde::Deserialize;
use utoipa::IntoParams;

use super::error::ApiError;
use super::extract::{Caller, Json};
use super::sse::{self, Next};
use super::AppState;
use crate::images::service::ImageServiceError;

impl From<ImageServiceError> for ApiError {
    fn from(e: ImageServiceError) -> Self {
        match e {
            ImageServiceError::NotFound(id) => ApiError::not_found(format!("image '{id}'")),
            ImageServiceError::Invalid(m) => ApiError::validation(m),
            e @ (ImageServiceError::InUse { .. } | ImageServiceError::Pulling(_)) => {
                ApiError::new(ErrorCode::Conflict, e.to_string())
            }
            e @ ImageServiceError::Failed { .. } => {
                ApiError::new(ErrorCode::ValidationError, e.to_string())
            }
            ImageServiceError::Image(e @ crate::images::ImageError::BadReference { .. }) => {
                ApiError::validation(e.to_string())
            }
            ImageServiceError::Image(e) => ApiError::new(ErrorCode::RuntimeError, e.to_string()),
            ImageServiceError::Store(e) => e.into(),
        }
    }
}

fn render(state: &AppState, row: crate::store::ImageRow) -> Image {
    state.images.with_progress(row).to_api()
}

#[utoipa::path(post, path = "/images", tag = "images",
    request_body = PullImageRequest,
    responses(
        (status = 202, description = "The image is being pulled; its events say how far", body = Image),
        (status = 400, description = "Malformed reference or body", body = hyperfleet_api::ErrorBody),
        (status = 401, description = "No valid API key", body = hyperfleet_api::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn pull(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<PullImageRequest>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Write)?;
    if req.reference.is_empty() || req.reference.len() > 512 {
        return Err(ApiError::validation("ref: 1 to 512 characters"));
    }
    let row = state.images.start_pull(&p.tenant, req).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(render(&state, row))).into_response())
}

#[utoipa::path(post, path = "/images/import", tag = "images",
    request_body(content = Vec<u8>, content_type = "application/x-tar",
        description = "An OCI image layout as a tar (`skopeo copy … oci-archive:`), or a `docker save` archive; read as it arrives"),
    responses(
        (status = 201, description = "The image is imported and ready", body = Image),
        (status = 400, description = "The archive is not a valid image, or a blob failed verification", body = hyperfleet_api::ErrorBody),
        (status = 401, description = "No valid API key", body = hyperfleet_api::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn import(
    State(state): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Write)?;
    let reader =
        tokio_util::io::StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    let sync = tokio_util::io::SyncIoBridge::new(reader);
    let row = state.images.import(&p.tenant, sync).await?;
    if row.status == ImageStatus::Failed {
        return Err(ApiError::new(
            ErrorCode::ValidationError,
            format!(
                "image {} failed: {}",
                row.id,
                row.error.as_deref().unwrap_or("unknown")
            ),
        ));
    }
    Ok((StatusCode::CREATED, axum::Json(render(&state, row))).into_response())
}

#[utoipa::path(get, path = "/images", tag = "images",
    responses((status = 200, body = ImageList)), security(("bearer" = [])))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Read)?;
    let images = state
        .store
        .images(&p.tenant)?
        .into_iter()
        .map(|r| render(&state, r))
        .collect();
    Ok(axum::Json(ImageList { images }).into_response())
}

fn find(state: &AppState, tenant: &str, id: &str) -> Result<crate::store::ImageRow, ApiError> {
    state
        .store
        .image(tenant, id)?
        .ok_or_else(|| ApiError::not_found(format!("image '{id}'")))
}

#[utoipa::path(get, path = "/images/{id}", tag = "images",
    params(("id" = String, Path, description = "Image id")),
    responses((status = 200, body = Image),
        (status = 404, description = "No such image for this tenant", body = hyperfleet_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Read)?;
    let row = find(&state, &p.tenant, &id)?;
    Ok(axum::Json(render(&state, row)).into_response())
}

#[utoipa::path(delete, path = "/images/{id}", tag = "images",
    params(("id" = String, Path, description = "Image id")),
    responses((status = 204, description = "Deleted; the filesystem goes with the image's last record"),
        (status = 404, description = "No such image for this tenant", body = hyperfleet_api::ErrorBody),
        (status = 409, description = "Machines made from this image exist, or it is still being pulled", body = hyperfleet_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Write)?;
    state.images.delete(&p.tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ImageEventsQuery {
    /// Only events with a larger id.
    #[param(minimum = 0)]
    after: Option<i64>,
}

#[utoipa::path(get, path = "/images/{id}/events", tag = "images",
    params(("id" = String, Path, description = "Image id"), ImageEventsQuery),
    responses((status = 200, description = "The stored events; with `Accept: text/event-stream`, then live ones (download progress included) until the image is ready, failed or deleted", body = ImageEventList),
        (status = 404, description = "No such image for this tenant", body = hyperfleet_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<ImageEventsQuery>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Read)?;
    let after = q.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::validation(format!(
            "after: must be at least 0, got {after}"
        )));
    }
    // Subscribe before reading history so nothing falls in between.
    let live = state.images.subscribe();
    let row = find(&state, &p.tenant, &id)?;
    let history = state.store.image_events(&row.id, after, 10000)?;
    if !sse::wanted(&headers) {
        let events = history.iter().map(|e| e.to_api()).collect();
        return Ok(axum::Json(ImageEventList { events }).into_response());
    }
    let ended = row.status != ImageStatus::Pulling;
    let mut last = history.last().map(|e| e.id).unwrap_or(after);
    let image_id = row.id.clone();
    Ok(sse::respond(
        history.iter().map(|e| image_sse(&e.to_api())).collect(),
        ended,
        live,
        "reconnect with ?after=<last id>",
        move |e: Arc<hyperfleet_api::ImageEvent>| {
            // Progress events are not stored (no id of their own to skip by).
            let progress = e.kind == "layer_progress";
            if e.image_id != image_id || !(progress || e.id > last) {
                return Next::Skip;
            }
            if !progress {
                last = e.id;
            }
            if matches!(e.kind.as_str(), "ready" | "failed" | "deleted") {
                Next::End(image_sse(&e))
            } else {
                Next::Send(image_sse(&e))
            }
        },
    ))
}

/// One image event as SSE (no id: progress events are not stored).
fn image_sse(e: &hyperfleet_api::ImageEvent) -> Event {
    // Plain data; serialising cannot fail.
    let data = serde_json::to_string(e).unwrap_or_default();
    Event::default().event(e.kind.clone()).data(data)
}
