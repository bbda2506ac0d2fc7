//! The schedule routes (docs/api.md, "Schedules"): `POST /v1/schedules` adds one (its cron
//! expression parsed, its steps parsed and checked against the catalog, refused with one line
//! otherwise), `GET /v1/schedules` lists them with their next and last runs,
//! `POST /v1/schedules/{name}/run` runs one now and answers when the run ended (409 while one
//! is in progress), `DELETE /v1/schedules/{name}` removes one (409 while it runs). The runs
//! themselves are the scheduler's ([`crate::server::scheduler`]).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use catalog::{format_time, CatchUp, Schedule as Record, ScheduleRun, Step};

use super::extract::{ApiPath, JsonBody};
use super::leases::Now;
use super::{bad, blocking, blocking_api, ApiError, ApiResult, Shared};
use crate::api::error::ErrorBody;
use crate::api::schedules::{Schedule, ScheduleDeleted, ScheduleList, ScheduleRequest, ScheduleRunInfo};
use crate::server::scheduler::{next_fire, parse_cron, Scheduler};

/// The scheduler, as handlers receive it.
type Sched = Extension<Arc<Scheduler>>;

fn run_info(r: &ScheduleRun) -> ScheduleRunInfo {
    ScheduleRunInfo {
        error: r.error.clone(),
        finished_at: format_time(r.finished_at),
        result: r.result.clone(),
        started_at: format_time(r.started_at),
    }
}

fn schedule(s: &Record, running: bool) -> Schedule {
    Schedule {
        catch_up: s.catch_up.name().into(),
        cron: s.cron.clone(),
        last_run: s.last_run.as_ref().map(run_info),
        last_success_at: s.last_success_at.map(format_time),
        name: s.name.clone(),
        next_run: next_fire(s).map(format_time),
        running,
        steps: s.steps.iter().map(ToString::to_string).collect(),
    }
}

/// The record a request asks for, checked except against the catalog.
fn record(req: ScheduleRequest, now: i64) -> ApiResult<Record> {
    parse_cron(&req.cron).map_err(bad)?;
    let steps = req.steps.iter().map(|s| Step::parse(s)).collect::<Result<Vec<_>, _>>()?;
    let catch_up = req.catch_up.as_deref().map(CatchUp::parse).transpose()?.unwrap_or_default();
    Ok(Record {
        name: req.name,
        cron: req.cron.trim().to_string(),
        steps,
        catch_up,
        created_at: now,
        ..Record::default()
    })
}

#[utoipa::path(post, path = "/v1/schedules", tag = "schedules", request_body = ScheduleRequest,
    responses((status = 200, description = "the schedule added", body = Schedule),
        (status = 400, description = "an invalid name, cron expression, step or catch_up; an environment in an ingest, mask or prune step", body = ErrorBody),
        (status = 404, description = "a step names neither a volume nor an environment", body = ErrorBody),
        (status = 409, description = "the name is taken", body = ErrorBody)))]
pub(super) async fn add(
    State(s): State<Shared>,
    Extension(clock): Now,
    JsonBody(body): JsonBody<ScheduleRequest>,
) -> ApiResult<Json<Schedule>> {
    let rec = record(body, clock.now_ms())?;
    blocking(&s, move |st| {
        let name = rec.name.clone();
        st.op(|cat| cat.add_schedule(rec))?;
        let cat = st.catalog();
        Ok(Json(schedule(cat.schedule(&name)?, false)))
    })
    .await
}

#[utoipa::path(get, path = "/v1/schedules", tag = "schedules",
    responses((status = 200, description = "every schedule with its next and last runs", body = ScheduleList)))]
pub(super) async fn list(State(s): State<Shared>, Extension(sched): Sched) -> ApiResult<Json<ScheduleList>> {
    blocking(&s, move |st| {
        let cat = st.catalog();
        let schedules = cat.schedules().values().map(|r| schedule(r, sched.is_running(&r.name))).collect();
        Ok(Json(ScheduleList { schedules }))
    })
    .await
}

#[utoipa::path(post, path = "/v1/schedules/{name}/run", tag = "schedules",
    params(("name" = String, Path, description = "schedule name")),
    responses((status = 200, description = "the run, ended (`result` ok or failed)", body = ScheduleRunInfo),
        (status = 404, description = "no such schedule", body = ErrorBody),
        (status = 409, description = "a run of it is in progress", body = ErrorBody)))]
pub(super) async fn run(
    State(s): State<Shared>,
    Extension(sched): Sched,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<ScheduleRunInfo>> {
    blocking_api(&s, move |_| Ok(Json(run_info(&sched.run_schedule(&name, None)?)))).await
}

#[utoipa::path(delete, path = "/v1/schedules/{name}", tag = "schedules",
    params(("name" = String, Path, description = "schedule name")),
    responses((status = 200, description = "the schedule removed", body = ScheduleDeleted),
        (status = 404, description = "no such schedule", body = ErrorBody),
        (status = 409, description = "a run of it is in progress", body = ErrorBody)))]
pub(super) async fn remove(
    State(s): State<Shared>,
    Extension(sched): Sched,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<ScheduleDeleted>> {
    if sched.is_running(&name) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("schedule `{name}` is running: delete it when the run ended"),
        ));
    }
    blocking(&s, move |st| {
        st.op(|cat| cat.remove_schedule(&name))?;
        Ok(Json(ScheduleDeleted { deleted: name }))
    })
    .await
}
