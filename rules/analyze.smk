# Analyses (methods.md 1-3). Each reads the cached hidden states; each rule's config
# section is its `settings` param, so changing a knob reruns exactly the rules reading it.

rule categorize_tokens:
    input:
        hidden="results/hidden/{model}/{dataset}/hidden.json",
        vocab="results/hidden/{model}/vocab.zarr",
        dataset="results/datasets/{dataset}",
    output:
        directory("results/analysis/{model}/{dataset}/categorize"),
    params:
        settings=section("categorize"),
        anchors=lambda wc: json.dumps(MODELS[wc.model].get("anchors", {}), sort_keys=True),
    log:
        "logs/categorize_tokens/{model}/{dataset}.log",
    conda:
        "../envs/analyze.yaml"
    shell:
        "embedlens categorize --hidden {input.hidden} --vocab {input.vocab} "
        "--dataset-dir {input.dataset} --settings {params.settings:q} "
        "--anchors {params.anchors:q} --model-name {wildcards.model} "
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
        settings=section("lens"),
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
        settings=section("probe"),
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
        settings=lambda wc: json.dumps({"extra_words": CFG["align"]["extra_words"]}),
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
        settings=lambda wc: json.dumps(CFG["align"], sort_keys=True),
    log:
        "logs/align_layers/{model}/{dataset}.log",
    conda:
        "../envs/analyze.yaml"
    shell:
        "embedlens align --hidden {input.hidden} --categories {input.categories} "
        "--text-states {input.text_states} --dataset-dir {input.dataset} "
        "--settings {params.settings:q} --model-name {wildcards.model} "
        "--dataset-name {wildcards.dataset} --out {output} > {log} 2>&1"
