-- For each question generated about a passage, the five passages of OTHER calls nearest to it
-- (cosine similarity of their embeddings).
--
-- Needs an embeddings model named `embedder` in sluice.toml, e.g.
--   [models.embedder]
--   kind = "openai_embeddings"
--   base_url = "https://api.openai.com/v1"
--   model = "text-embedding-3-small"      # 1536 dimensions: udfs/embed.toml says dim = 1536
--   api_key_env = "OPENAI_API_KEY"
-- Calls: one generate_questions per passage, one embed per passage and one per question.

CREATE EXTERNAL TABLE transcripts STORED AS JSON LOCATION 'data/transcripts/';

CREATE VIEW passages AS
  SELECT ticker, q AS quarter, date, unnest(chunk_text(transcript, 4096)) AS passage
  FROM transcripts;

CREATE VIEW passage_vectors AS
  SELECT ticker, quarter, passage, embed(passage) AS v FROM passages;

CREATE VIEW question_vectors AS
  SELECT ticker, quarter, question, embed(question) AS v
  FROM (SELECT ticker, quarter,
               unnest(generate_questions(ticker, quarter, date, passage)) AS question
        FROM passages);

COPY (
  SELECT question, ticker, quarter, other_ticker, other_quarter, passage, similarity
  FROM (
    SELECT q.question, q.ticker, q.quarter, p.ticker AS other_ticker, p.quarter AS other_quarter,
           p.passage, cosine_similarity(q.v, p.v) AS similarity,
           row_number() OVER (PARTITION BY q.question
                              ORDER BY cosine_similarity(q.v, p.v) DESC) AS rank
    FROM question_vectors q
    JOIN passage_vectors p ON p.ticker <> q.ticker OR p.quarter <> q.quarter
  )
  WHERE rank <= 5
  ORDER BY question, similarity DESC
) TO 'out/similar_passages.parquet' STORED AS PARQUET;

CREATE EXTERNAL TABLE similar_passages STORED AS PARQUET LOCATION 'out/similar_passages.parquet';
SELECT question, other_ticker, other_quarter, round(similarity, 3) AS similarity
FROM similar_passages ORDER BY question, similarity DESC LIMIT 10;
