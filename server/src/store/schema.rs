//! diesel table definitions; must match `migrations/{postgres,sqlite}`.

diesel::table! {
    agents (id) {
        id -> Text,
        created_at -> BigInt,
        online -> Bool,
        pod -> Nullable<Text>,
        epoch -> BigInt,
        connected_at -> Nullable<BigInt>,
        last_seen -> Nullable<BigInt>,
        version -> Nullable<Text>,
        hostname -> Nullable<Text>,
        os -> Nullable<Text>,
        arch -> Nullable<Text>,
    }
}

diesel::table! {
    commands (id) {
        id -> Text,
        agent_id -> Text,
        name -> Text,
        args -> Text,
        status -> Text,
        output -> Nullable<Text>,
        created_at -> BigInt,
        delivered_at -> Nullable<BigInt>,
        completed_at -> Nullable<BigInt>,
        expires_at -> Nullable<BigInt>,
        attempts -> Integer,
        job_id -> Nullable<Text>,
        held -> Bool,
    }
}

diesel::table! {
    inventories (agent_id) {
        agent_id -> Text,
        body -> Text,
        size_bytes -> BigInt,
        received_at -> BigInt,
    }
}

diesel::joinable!(commands -> agents (agent_id));
diesel::joinable!(inventories -> agents (agent_id));
diesel::allow_tables_to_appear_in_same_query!(agents, commands, inventories);

diesel::table! {
    binaries (id) {
        id -> Text,
        name -> Text,
        version -> Text,
        os -> Text,
        arch -> Text,
        notes -> Nullable<Text>,
        size_bytes -> BigInt,
        sha256 -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    rollouts (id) {
        id -> Text,
        binary_id -> Text,
        os -> Text,
        arch -> Text,
        version -> Text,
        label -> Nullable<Text>,
        percentage -> Integer,
        max_concurrent -> Integer,
        status -> Text,
        created_at -> BigInt,
        ended_at -> Nullable<BigInt>,
        allow_downgrade -> Bool,
        reason -> Nullable<Text>,
    }
}

diesel::table! {
    rollout_brakes (rollout_id) {
        rollout_id -> Text,
        max_failure_ratio -> Double,
        min_sample -> BigInt,
        judged_failed -> BigInt,
        judged_finished -> BigInt,
    }
}

diesel::table! {
    rollout_agents (rollout_id, agent_id) {
        rollout_id -> Text,
        agent_id -> Text,
        status -> Text,
        from_version -> Nullable<Text>,
        offered_at -> BigInt,
        offered_epoch -> BigInt,
        finished_at -> Nullable<BigInt>,
        error -> Nullable<Text>,
    }
}

diesel::table! {
    agent_labels (agent_id, label) {
        agent_id -> Text,
        label -> Text,
        source -> Text,
    }
}

diesel::table! {
    ui_sessions (id_hash) {
        id_hash -> Text,
        created_at -> BigInt,
        expires_at -> BigInt,
    }
}

diesel::joinable!(rollouts -> binaries (binary_id));
diesel::joinable!(rollout_agents -> rollouts (rollout_id));
diesel::joinable!(rollout_brakes -> rollouts (rollout_id));
diesel::joinable!(rollout_agents -> agents (agent_id));
diesel::joinable!(agent_labels -> agents (agent_id));
diesel::allow_tables_to_appear_in_same_query!(
    agents,
    binaries,
    rollouts,
    rollout_agents,
    rollout_brakes,
    agent_labels
);

diesel::table! {
    agent_credentials (client_id) {
        client_id -> Text,
        generation -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    api_tokens (jti) {
        jti -> Text,
        name -> Nullable<Text>,
        role -> Text,
        subject -> Text,
        created_at -> BigInt,
        expires_at -> BigInt,
        last_used_at -> Nullable<BigInt>,
        revoked_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    enroll_secrets (id) {
        id -> Text,
        name -> Text,
        secret_sha256 -> Text,
        labels -> Text,
        allow_reenroll -> Bool,
        created_at -> BigInt,
        expires_at -> Nullable<BigInt>,
        max_uses -> Nullable<BigInt>,
        use_count -> BigInt,
        last_used_at -> Nullable<BigInt>,
        revoked_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    audit_log (id) {
        id -> BigInt,
        at -> BigInt,
        actor_kind -> Text,
        actor -> Text,
        actor_jti -> Nullable<Text>,
        source -> Nullable<Text>,
        action -> Text,
        target -> Nullable<Text>,
        detail -> Nullable<Text>,
    }
}

diesel::table! {
    jobs (id) {
        id -> Text,
        name -> Text,
        args -> Text,
        target -> Text,
        status -> Text,
        reason -> Nullable<Text>,
        targeted -> BigInt,
        canary -> BigInt,
        max_in_flight -> BigInt,
        rate_per_second -> Nullable<BigInt>,
        max_failure_ratio -> Nullable<Double>,
        min_sample -> BigInt,
        expires_at -> Nullable<BigInt>,
        created_at -> BigInt,
        ended_at -> Nullable<BigInt>,
        cancelled -> BigInt,
    }
}

diesel::table! {
    job_pacing (job_id) {
        job_id -> Text,
        updated_at -> BigInt,
        released -> BigInt,
        release_clock -> BigInt,
        brake_failed -> BigInt,
        brake_finished -> BigInt,
    }
}

diesel::joinable!(job_pacing -> jobs (job_id));
diesel::allow_tables_to_appear_in_same_query!(jobs, job_pacing, commands, agent_labels);
