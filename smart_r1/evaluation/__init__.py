"""What a user does with a trained simulator: score it, and send it to the WOSAC leaderboard.

Modules:
    submission    `SimAgentsChallengeSubmission` shards checked with the official rules, tar.gz
    leaderboard   the leaderboard table (meta metric, category scores, likelihoods, rates)
    evaluate      roll out a checkpoint over a dataset, score it, report and export
"""
