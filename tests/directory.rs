//! The directory and help queue against a real PostgreSQL and a real
//! SQLite file: the same behaviour on both.

mod common;

use std::sync::Arc;

use cellgate::directory::{
    ClaimOutcome, Directory, DirectoryError, NewHelpRequest, ResolveOutcome,
};
use cellgate::model::{HelpStatus, InstructorRef};
use common::TestDb;

async fn both() -> Vec<(&'static str, TestDb, Directory)> {
    let (pg, pg_dir) = TestDb::postgres().await;
    let (lite, lite_dir) = TestDb::sqlite().await;
    vec![("postgres", pg, pg_dir), ("sqlite", lite, lite_dir)]
}

async fn classroom_with_staff(directory: &Directory, staff: usize) -> Vec<InstructorRef> {
    directory.add_classroom("cls-101", 30).await.unwrap();
    let mut out = Vec::new();
    for n in 0..staff {
        let email = format!("t{n}@example.edu");
        let added = directory
            .add_instructor(&email, &format!("Teacher {n}"))
            .await
            .unwrap();
        directory.add_staff("cls-101", &email).await.unwrap();
        out.push(InstructorRef {
            id: added.id,
            name: added.name,
        });
    }
    out
}

fn help(id: &str, seat: u32) -> NewHelpRequest {
    NewHelpRequest {
        request_id: id.to_string(),
        classroom: "cls-101".into(),
        seat,
        student: format!("s-{seat:04}"),
        message: Some("stuck".into()),
        created_at_ms: 1_700_000_000_000 + i64::from(seat),
    }
}

#[tokio::test]
async fn instructors_are_found_by_email_with_their_classrooms() {
    for (backend, _db, directory) in both().await {
        classroom_with_staff(&directory, 1).await;
        let found = directory
            .instructor_by_email(" T0@Example.edu ")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.email, "t0@example.edu", "{backend}");
        assert_eq!(found.classrooms, ["cls-101"], "{backend}");
        assert!(found.is_active, "{backend}");

        directory.set_active("t0@example.edu", false).await.unwrap();
        let found = directory
            .instructor_by_email("t0@example.edu")
            .await
            .unwrap()
            .unwrap();
        assert!(!found.is_active, "{backend}");
        assert!(
            directory
                .instructor_by_email("nobody@example.edu")
                .await
                .unwrap()
                .is_none()
        );
    }
}

#[tokio::test]
async fn duplicates_and_bad_input_are_refused_with_a_clear_error() {
    for (backend, _db, directory) in both().await {
        classroom_with_staff(&directory, 1).await;
        let again = directory
            .add_instructor("t0@example.edu", "Again")
            .await
            .unwrap_err();
        assert!(
            matches!(again, DirectoryError::Conflict(_)),
            "{backend}: {again}"
        );
        let room = directory.add_classroom("cls-101", 10).await.unwrap_err();
        assert!(
            matches!(room, DirectoryError::Conflict(_)),
            "{backend}: {room}"
        );
        let bad = directory.add_classroom("no spaces", 10).await.unwrap_err();
        assert!(
            matches!(bad, DirectoryError::Invalid(_)),
            "{backend}: {bad}"
        );
        let missing = directory
            .add_staff("cls-101", "ghost@example.edu")
            .await
            .unwrap_err();
        assert!(
            matches!(missing, DirectoryError::NotFound(_)),
            "{backend}: {missing}"
        );
        assert_eq!(
            directory.pending_migrations().await.unwrap(),
            0,
            "{backend}"
        );
    }
}

#[tokio::test]
async fn a_help_request_is_stored_once() {
    for (backend, _db, directory) in both().await {
        classroom_with_staff(&directory, 1).await;
        let fresh = directory
            .insert_help_requests(&[help("r1", 4), help("r2", 5)])
            .await
            .unwrap();
        assert_eq!(fresh, [true, true], "{backend}");
        let again = directory
            .insert_help_requests(&[help("r1", 4)])
            .await
            .unwrap();
        assert_eq!(again, [false], "{backend}");

        let queue = directory.help_queue("cls-101").await.unwrap();
        let ids: Vec<_> = queue.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(ids, ["r1", "r2"], "{backend}");
        assert_eq!(queue[0].message.as_deref(), Some("stuck"));
    }
}

#[tokio::test]
async fn of_twenty_racing_claims_exactly_one_wins() {
    for (backend, _db, directory) in both().await {
        let staff = classroom_with_staff(&directory, 20).await;
        directory
            .insert_help_requests(&[help("r1", 4)])
            .await
            .unwrap();

        let directory = Arc::new(directory);
        let claims = staff.iter().cloned().map(|who| {
            let directory = directory.clone();
            tokio::spawn(async move { (who.clone(), directory.claim_help("r1", &who).await) })
        });
        let results = futures_util::future::join_all(claims).await;

        let mut winners = Vec::new();
        let mut losers = Vec::new();
        for result in results {
            match result.unwrap() {
                (who, Ok(ClaimOutcome::Claimed { .. })) => winners.push(who),
                (_, Ok(ClaimOutcome::AlreadyClaimed(by))) => losers.push(by),
                (_, other) => panic!("{backend}: unexpected {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "{backend}");
        assert_eq!(losers.len(), 19, "{backend}");
        assert!(
            losers.iter().all(|by| *by == winners[0]),
            "{backend}: losers name the winner"
        );
    }
}

#[tokio::test]
async fn resolve_and_cancel_close_requests() {
    for (backend, _db, directory) in both().await {
        let staff = classroom_with_staff(&directory, 1).await;
        directory
            .insert_help_requests(&[help("r1", 4), help("r2", 5)])
            .await
            .unwrap();

        let resolved = directory.resolve_help("r1", &staff[0]).await.unwrap();
        assert!(
            matches!(resolved, ResolveOutcome::Resolved { .. }),
            "{backend}"
        );
        let again = directory.resolve_help("r1", &staff[0]).await.unwrap();
        assert_eq!(
            again,
            ResolveOutcome::Closed(HelpStatus::Resolved),
            "{backend}"
        );
        assert_eq!(
            directory.resolve_help("nope", &staff[0]).await.unwrap(),
            ResolveOutcome::NotFound
        );

        let cancelled = directory
            .cancel_help("cls-101", "s-0005", None)
            .await
            .unwrap();
        assert_eq!(cancelled.len(), 1, "{backend}");
        assert_eq!(cancelled[0].request_id, "r2");
        let claim = directory.claim_help("r2", &staff[0]).await.unwrap();
        assert_eq!(
            claim,
            ClaimOutcome::Closed(HelpStatus::Cancelled),
            "{backend}"
        );
        assert!(
            directory.help_queue("cls-101").await.unwrap().is_empty(),
            "{backend}"
        );
    }
}

#[tokio::test]
async fn an_unreachable_database_is_a_transient_error() {
    let directory = Directory::connect_lazy("postgres://postgres@127.0.0.1:1/nothing").unwrap();
    let error = directory.ping().await.unwrap_err();
    assert!(error.is_transient(), "{error:?}");
}

#[tokio::test]
async fn a_failed_migration_says_why_the_database_is_unreachable_and_says_it_once() {
    // Regression: the pool reported only "pool timed out", and the chain of
    // causes repeated that line three times.
    let directory = Directory::connect_lazy("postgres://postgres@127.0.0.1:1/nothing").unwrap();
    let error = directory.migrate().await.unwrap_err();
    let report = format!("{:#}", anyhow::Error::new(error));
    assert!(report.contains("Connection refused"), "{report}");
    assert_eq!(report.matches("Connection refused").count(), 1, "{report}");
    assert!(!report.contains("pool timed out"), "{report}");
}
