# Analyses (docs/methods.md 1-3). Each reads the cached hidden states; each rule's config
# section (as the model's mode sets it, with the mode) is its `settings` param, so changing
# a knob reruns exactly the rules reading it.

# Anchors are the model's, not a data set's: found once over all its data sets
# (pooled), then every categorize_tokens of the model uses them. Its data sets come from
# the config alone (model_datasets), never from a checkpoint: params that read checkpoint
# outputs make Snakemake re-plan finished jobs (see has_vqa).
rule discover_anchors:
    input:
        hidden=lambda wc: [f"results/hidden/{wc.model}/{d}/hidden.json" for d in model_datasets(wc.model)],
        vocab="results/hidden/{model}/vocab.zarr",
        datasets=lambda wc: [f"results/datasets/{d}" for d in model_datasets(wc.model)],
    output:
        directory("results/analysis/{model}/anchors"),
    params:
        names=lambda wc: model_datasets(wc.model),
        settings=model_section("categorize"),
        anchors=lambda wc: json.dumps(MODELS[wc.model].get("anchors", {}), sort_keys=True),
    log:
        "logs/discover_anchors/{model}.log",
    conda:
        "../envs/analyze.yaml"
    shell:
        "embedlens anchors --hidden {input.hidden:q} --vocab {input.vocab} "
        "--dataset-dir {input.datasets:q} --dataset-name {params.names:q} "
        "--settings {params.settings:q} --anchors {params.anchors:q} "
        "--model-name {wildcards.model} --out {output} > {log} 2>&1"


rule categorize_tokens:
    input:
        hidden="results/hidden/{model}/{dataset}/hidden.json",
        vocab="results/hidden/{model}/vocab.zarr",
        dataset="results/datasets/{dataset}",
        anchors="results/analysis/{model}/anchors",
    output:
        directory("results/analysis/{model}/{dataset}/categorize"),
    params:
        settings=model_section("categorize"),
        anchors=lambda wc: json.dumps(MODELS[wc.model].get("anchors", {}), sort_keys=True),
    log:
        "logs/categorize_tokens/{model}/{dataset}.log",
    conda:
        "../envs/analyze.yaml"
    shell:
        "embedlens categorize --hidden {input.hidden} --vocab {input.vocab} "
        "--dataset-dir {input.dataset} --settings {params.settings:q} "
        "--anchors {params.anchors:q} --anchors-dir {input.anchors} --model-name {wildcards.model} "
        "--dataset-name {wildcards.dataset} --out {output} > {log} 2>&1"


rule compute_lens:
    input:
        model=model_input,
        hidden="results/hidden/{model}/{dataset}/hidden.json",
        vocab="results/hidden/{model}/vocab.zarr",
    output:
        directory("results/analysis/{model}/{dataset}/lens"),
    params:
        model_dir=lambda wc: model_dir(wc.model),
        settings=model_section("lens"),
        trust=trust_flag,
    log:
        "logs/compute_lens/{model}/{dataset}.log",
    conda:
        "../envs/analyze.yaml"
    shell:
        "embedlens lens --hidden {input.hidden} --vocab {input.vocab} "
        "--model-dir {params.model_dir:q} {params.trust} --settings {params.settings:q} "
        "--model-name {wildcards.model} --dataset-name {wildcards.dataset} "
        "--out {output} > {log} 2>&1"


rule probe_tokens:
    input:
        hidden="results/hidden/{model}/{dataset}/hidden.json",
        vocab="results/hidden/{model}/vocab.zarr",
        categories="results/analysis/{model}/{dataset}/categorize",
        dataset="results/datasets/{dataset}",
    output:
        directory("results/analysis/{model}/{dataset}/probe"),
    params:
        settings=model_section("probe"),
    log:
        "logs/probe_tokens/{model}/{dataset}.log",
    conda:
        "../envs/analyze.yaml"
    shell:
        "embedlens probe --hidden {input.hidden} --vocab {input.vocab} "
        "--categories {input.categories} --dataset-dir {input.dataset} --settings {params.settings:q} "
        "--model-name {wildcards.model} --dataset-name {wildcards.dataset} "
        "--out {output} > {log} 2>&1"


rule collect_text_states:
    input:
        model=model_input,
        dataset="results/datasets/{dataset}",
    output:
        directory("results/analysis/{model}/{dataset}/text_states"),
    params:
        model_dir=lambda wc: model_dir(wc.model),
        settings=lambda wc: json.dumps({"extra_words": CFG["align"]["extra_words"],
                                        "mode": MODELS[wc.model]["mode"]}, sort_keys=True),
        device=lambda wc: extraction(wc.model)["device"],
        trust=trust_flag,
    resources:
        gpu=lambda wc: uses_gpu(wc.model),
    log:
        "logs/collect_text_states/{model}/{dataset}.log",
    conda:
        "../envs/analyze.yaml"
    shell:
        "embedlens text-states --model-dir {params.model_dir:q} {params.trust} "
        "--dataset-dir {input.dataset} --settings {params.settings:q} "
        "--device {params.device} --model-name {wildcards.model} "
        "--dataset-name {wildcards.dataset} --out {output} > {log} 2>&1"


rule align_layers:
    input:
        hidden="results/hidden/{model}/{dataset}/hidden.json",
        categories="results/analysis/{model}/{dataset}/categorize",
        text_states="results/analysis/{model}/{dataset}/text_states",
        dataset="results/datasets/{dataset}",
    output:
        directory("results/analysis/{model}/{dataset}/align"),
    params:
        settings=model_section("align"),
    log:
        "logs/align_layers/{model}/{dataset}.log",
    conda:
        "../envs/analyze.yaml"
    shell:
        "embedlens align --hidden {input.hidden} --categories {input.categories} "
        "--text-states {input.text_states} --dataset-dir {input.dataset} "
        "--settings {params.settings:q} --model-name {wildcards.model} "
        "--dataset-name {wildcards.dataset} --out {output} > {log} 2>&1"
