# Per-step settings files: each rule reads its own, so that a change reruns only what it affects.


rule step_config:
    """One step's settings; rewritten only when they change (Snakemake compares the params)."""
    output:
        step_config("{step}"),
    log:
        f"{R}/logs/step_config/{{step}}.log",
    wildcard_constraints:
        step="|".join(STEP_SETTINGS),
    localrule: True
    params:
        settings=lambda wildcards: {key: config[key] for key in STEP_SETTINGS[wildcards.step]},
    run:
        write_settings(output[0], params.settings)
